"""A repository model's effective configuration: its ``config.pbtxt`` checked against what
the model file declares, or derived from the file where the config is silent (as Triton's
auto-complete does for ONNX), and the image preprocessing its ``parameters`` declare.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classification.preprocess import Preprocess
from repository.layout import ModelLoadError
from repository.runners import FileTensor
from serving.tensors import TensorSpec

logger = logging.getLogger(__name__)

# The parameters an image model declares, with what each means (README, "Model repository").
IMAGE_PARAMETERS = {
    "image_resize": "shorter side, in pixels, before the centred crop (declares an image model)",
    "image_crop": "side of the centred square crop; default the input's height",
    "image_mean": "per-channel mean subtracted, in pixel units 0-255, e.g. 123.7,116.3,103.5",
    "image_std": "per-channel divisor, in pixel units 0-255, e.g. 58.4,57.1,57.4",
    "image_channels": "RGB (default) or BGR",
    "scores": "softmax (default) or none: how POST /{name} turns the labelled output to scores",
    "top_k": "classes POST /{name} returns by default (5)",
}


@dataclass(frozen=True)
class ImageInput:
    """An image model's one input: how an encoded image becomes it."""

    name: str
    preprocess: Preprocess
    layout: str  # "NCHW" or "NHWC"
    bgr: bool
    datatype: str  # FP32 or FP16


@dataclass
class Resolved:
    """What serving a repository model needs from its configuration."""

    config: Any  # the effective ModelConfig
    inputs: tuple[TensorSpec, ...]  # as the model file takes them, rows first
    outputs: tuple[TensorSpec, ...]
    image: ImageInput | None = None
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    softmax: bool = True
    top_k: int = 5

    @property
    def classified(self) -> str | None:
        """The output that carries labels: POST /{name} answers its top classes."""
        return next(iter(self.labels), None)


def datatype_of(config_type: int, pb: Any) -> str:
    """``TYPE_FP32`` as the protocol names it (``FP32``; ``TYPE_STRING`` is ``BYTES``)."""
    name = str(pb.DataType.Name(config_type)).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def config_type_of(datatype: str, pb: Any) -> int:
    return int(pb.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))


def resolve(
    config: Any,
    signature: tuple[list[FileTensor], list[FileTensor]] | None,
    file: Path,
    where: str,
    pb: Any,
) -> Resolved:
    """The effective configuration of the model in ``file``, from ``config`` (empty when
    the model has no config.pbtxt), which came from ``where`` (its config.pbtxt, or a
    load request). Raises ModelLoadError naming where and the field."""
    config = _complete(config, signature, file, where, pb)
    inputs = tuple(_spec(t, "input", where, pb) for t in config.input)
    outputs = tuple(_spec(t, "output", where, pb) for t in config.output)
    resolved = Resolved(config, inputs, outputs)
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    for key in parameters:
        if key.startswith("image_") and key not in IMAGE_PARAMETERS:
            raise ModelLoadError(
                f"{where}: unknown parameter {key!r}; the image parameters are"
                f" {', '.join(k for k in IMAGE_PARAMETERS if k.startswith('image_'))}"
            )
    if "image_resize" in parameters:
        resolved.image = _image_input(config, parameters, where, pb)
    elif any(key.startswith("image_") for key in parameters):
        raise ModelLoadError(f"{where}: image parameters need 'image_resize' to declare an image")
    for output in config.output:
        if output.label_filename:
            resolved.labels[output.name] = _labels(
                file.parent.parent / output.label_filename, output, where
            )
    scores = parameters.get("scores", "softmax")
    if scores not in ("softmax", "none"):
        raise ModelLoadError(f"{where}: parameter 'scores' is {scores!r}; use softmax or none")
    resolved.softmax = scores == "softmax"
    top_k = parameters.get("top_k", "5")
    if not top_k.isdigit() or not 1 <= int(top_k) <= 1000:
        raise ModelLoadError(f"{where}: parameter 'top_k' is {top_k!r}; use a count from 1")
    resolved.top_k = int(top_k)
    return resolved


def _complete(
    config: Any,
    signature: tuple[list[FileTensor], list[FileTensor]] | None,
    file: Path,
    where: str,
    pb: Any,
) -> Any:
    """``config`` with the inputs, outputs and batching the file declares filled in, and
    what it declares checked against the file."""
    complete = pb.ModelConfig()
    complete.CopyFrom(config)
    complete.name = file.parent.parent.name
    if signature is None:  # TorchScript: the config must say
        if not config.input or not config.output:
            raise ModelLoadError(
                f"{where}: a TorchScript model needs 'input' and 'output' declared, in the order"
                " its forward takes and returns them"
            )
        if config.max_batch_size < 1:
            raise ModelLoadError(f"{where}: set 'max_batch_size' (this server batches every model)")
        return complete
    file_inputs, file_outputs = signature
    batching = config.max_batch_size > 0 or (
        not config.input and all(t.shape[:1] == (-1,) for t in [*file_inputs, *file_outputs])
    )
    if not batching:
        raise ModelLoadError(
            f"{where if config.input else file}: 'max_batch_size' is 0 (no batching); this"
            " server batches every model: set max_batch_size, and export the model with a"
            " dynamic first dimension"
        )
    for kind, declared, in_file in (
        ("input", complete.input, file_inputs),
        ("output", complete.output, file_outputs),
    ):
        by_name = {t.name: t for t in in_file}
        if not declared:
            for tensor in in_file:
                declared.add(
                    name=tensor.name,
                    data_type=config_type_of(tensor.datatype, pb),
                    dims=list(tensor.shape[1:]),
                )
        for tensor in declared:
            found = by_name.get(tensor.name)
            if found is None:
                raise ModelLoadError(
                    f"{where}: {kind} {tensor.name!r} is not in {file.name}; it has"
                    f" {', '.join(map(repr, by_name))}"
                )
            _check_against_file(kind, tensor, found, where, file, pb)
    return complete


def _check_against_file(
    kind: str, declared: Any, found: FileTensor, where: str, file: Path, pb: Any
) -> None:
    datatype = datatype_of(declared.data_type, pb)
    if datatype != found.datatype:
        raise ModelLoadError(
            f"{where}: {kind} {declared.name!r} field 'data_type' is TYPE_{datatype};"
            f" {file.name} has {found.datatype}"
        )
    if found.shape[:1] != (-1,):
        raise ModelLoadError(
            f"{file}: {kind} {declared.name!r} has a fixed first dimension ({found.shape[0]});"
            " export it with a dynamic batch dimension to serve it batched"
        )
    dims, file_dims = list(declared.dims), list(found.shape[1:])
    fits = len(dims) == len(file_dims) and all(
        -1 in (a, b) or a == b for a, b in zip(dims, file_dims, strict=True)
    )
    if not fits:
        raise ModelLoadError(
            f"{where}: {kind} {declared.name!r} field 'dims' is {dims}; {file.name} has"
            f" {file_dims} (after the batch dimension; -1 is any size)"
        )


def _spec(tensor: Any, kind: str, where: str, pb: Any) -> TensorSpec:
    if not tensor.name:
        raise ModelLoadError(f"{where}: an {kind} has no 'name'")
    if tensor.data_type == pb.TYPE_INVALID:
        raise ModelLoadError(f"{where}: {kind} {tensor.name!r} has no 'data_type'")
    if not tensor.dims:
        raise ModelLoadError(f"{where}: {kind} {tensor.name!r} has no 'dims'")
    return TensorSpec(tensor.name, datatype_of(tensor.data_type, pb), (-1, *tensor.dims))


def _numbers(parameters: dict[str, str], key: str, default: str, where: str) -> tuple[float, ...]:
    text = parameters.get(key, default)
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ModelLoadError(f"{where}: parameter {key!r} is {text!r}; write numbers") from None
    if len(values) != 3:
        raise ModelLoadError(f"{where}: parameter {key!r} needs 3 values, one per channel")
    return values


def _size(parameters: dict[str, str], key: str, default: int, where: str) -> int:
    text = parameters.get(key, str(default))
    if not text.isdigit() or int(text) < 1:
        raise ModelLoadError(f"{where}: parameter {key!r} is {text!r}; write a size in pixels")
    return int(text)


def _image_input(config: Any, parameters: dict[str, str], where: str, pb: Any) -> ImageInput:
    if len(config.input) != 1:
        raise ModelLoadError(f"{where}: an image model (image_resize) takes exactly one input")
    (tensor,) = config.input
    dims = list(tensor.dims)
    if tensor.format == pb.ModelInput.FORMAT_NHWC or (
        tensor.format == pb.ModelInput.FORMAT_NONE and len(dims) == 3 and dims[-1] == 3
    ):
        layout, (height, width, channels) = "NHWC", dims if len(dims) == 3 else (0, 0, 0)
    else:
        layout, (channels, height, width) = "NCHW", dims if len(dims) == 3 else (0, 0, 0)
    if len(dims) != 3 or channels != 3:
        raise ModelLoadError(
            f"{where}: input {tensor.name!r} field 'dims' is {dims}; an image input is"
            " [3, height, width] (FORMAT_NCHW) or [height, width, 3] (FORMAT_NHWC)"
        )
    datatype = datatype_of(tensor.data_type, pb)
    if datatype not in ("FP32", "FP16"):
        raise ModelLoadError(f"{where}: image input {tensor.name!r} must be TYPE_FP32 or TYPE_FP16")
    crop = _size(parameters, "image_crop", height if height > 0 else 224, where)
    if -1 not in (height, width) and (height, width) != (crop, crop):
        raise ModelLoadError(
            f"{where}: parameter 'image_crop' is {crop} but input {tensor.name!r} is"
            f" {height}x{width}; the crop is square and must fit the input"
        )
    channels_order = parameters.get("image_channels", "RGB")
    if channels_order not in ("RGB", "BGR"):
        raise ModelLoadError(
            f"{where}: parameter 'image_channels' is {channels_order!r}; RGB or BGR"
        )
    mean = _numbers(parameters, "image_mean", "0,0,0", where)
    std = _numbers(parameters, "image_std", "1,1,1", where)
    if any(s <= 0 for s in std):
        raise ModelLoadError(f"{where}: parameter 'image_std' must be positive")
    resize = _size(parameters, "image_resize", 256, where)
    preprocess = Preprocess(resize, crop, mean, std)  # type: ignore[arg-type]
    return ImageInput(tensor.name, preprocess, layout, channels_order == "BGR", datatype)


def _labels(path: Path, output: Any, where: str) -> tuple[str, ...]:
    try:
        labels = tuple(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{where}: output {output.name!r} field 'label_filename': cannot read {path} ({exc})"
        ) from None
    classes = output.dims[-1] if output.dims else -1
    if classes > 0 and len(labels) != classes:
        raise ModelLoadError(
            f"{path}: {len(labels)} labels for output {output.name!r} of {classes} classes;"
            " write one label per line, one per class"
        )
    return labels
