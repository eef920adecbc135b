"""Triton's ``config.pbtxt``: a model's configuration as protobuf text, read against the
ModelConfig of v2/proto/inference.proto (Triton's field numbers, the fields this server
uses). A field it does not know stops that model's load with a message naming the file,
the line and the field: a misspelt one with the field meant, one of Triton's that this
server does not serve as such.
"""

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format

from v2.stubs import messages

# The fields of Triton's ModelConfig, and of the messages in it, that this server does
# not read: a config that sets one is refused, rather than served as if it did not.
UNSUPPORTED = frozenset(
    {
        "runtime",
        "batch_input",
        "batch_output",
        "optimization",
        "sequence_batching",
        "ensemble_scheduling",
        "cc_model_filenames",
        "metric_tags",
        "model_warmup",
        "model_operations",
        "model_transaction_policy",
        "model_repository_agents",
        "response_cache",
        "model_metrics",
        "reshape",
        "is_shape_tensor",
        "allow_ragged_batch",
        "optional",
        "is_non_linear_format_io",
        "preserve_ordering",
        "priority_levels",
        "default_priority_level",
        "priority_queue_policy",
        "rate_limiter",
        "secondary_devices",
        "profile",
        "passive",
        "host_policy",
    }
)
_NO_FIELD = re.compile(r'Message type "inference\.(\w+)" has no field named "(\w+)"')


class ModelConfigError(ValueError):
    """A config.pbtxt this server cannot serve; the message names the file and field."""


def parse_config(text: str, path: Path | str = "config.pbtxt") -> Any:
    """The ModelConfig that ``text`` (the content of ``path``) sets."""
    return _parsed(text_format.Parse, text_format.ParseError, text, path)


def parse_json_config(text: str, where: str) -> Any:
    """The ModelConfig that ``text`` sets as JSON (Triton's load request parameter
    ``config``), with the same checks as a config.pbtxt; ``where`` names it in errors."""
    return _parsed(json_format.Parse, json_format.ParseError, text, where)


def _parsed(
    parse: Callable[[str, Any], Any], error: type[Exception], text: str, where: Path | str
) -> Any:
    pb = messages()
    config = pb.ModelConfig()
    try:
        parse(text, config)
    except error as exc:
        raise ModelConfigError(_explain(exc, where, pb)) from None
    return config


def read_config(path: Path) -> Any:
    """The ModelConfig in the file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot be read ({exc})") from None
    return parse_config(text, path)


def _explain(error: Exception, path: Path | str, pb: Any) -> str:
    line = error.GetLine() if isinstance(error, text_format.ParseError) else None
    where = f"{path}:{line}" if line else str(path)
    found = _NO_FIELD.search(str(error))
    if found is None:
        detail = str(error).split(" : ", 1)[-1]
        return f"{where}: {detail}"
    message_name, field = found.groups()
    if field in UNSUPPORTED:
        return (
            f"{where}: field {field!r} of Triton's model configuration is not supported by"
            " this server; remove it"
        )
    known = list(getattr(pb, message_name).DESCRIPTOR.fields_by_name)
    close = difflib.get_close_matches(field, known, n=1)
    hint = (
        f"; did you mean {close[0]!r}?" if close else f"; {message_name} takes {', '.join(known)}"
    )
    return f"{where}: unknown field {field!r} in {message_name}{hint}"
