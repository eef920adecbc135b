"""A model repository in Triton's layout, read from disk: which models it holds, their
``config.pbtxt``, and which of their versions to serve.

    MODEL_REPOSITORY/
      resnet/
        config.pbtxt          optional for ONNX
        labels.txt            named by an output's label_filename
        1/model.onnx
        2/model.onnx          versions are folders named by whole numbers
      scripted/
        config.pbtxt          required for TorchScript: it names the inputs and outputs
        1/model.pt

A model that cannot be served (no version folder, a config that does not parse, a file
missing) is set aside with the reason, naming the file and the field; the others are
served.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from v2.model_config import ModelConfigError, parse_json_config, read_config
from v2.stubs import messages

CONFIG_FILE = "config.pbtxt"
# Triton's platform and backend names, by the file each loads by default.
ONNX, TORCHSCRIPT = "onnxruntime_onnx", "pytorch_libtorch"
DEFAULT_FILES = {ONNX: "model.onnx", TORCHSCRIPT: "model.pt"}
_BACKENDS = {"onnxruntime": ONNX, "pytorch": TORCHSCRIPT}
# A name that is safe as a route and a metric label.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ModelLoadError(ValueError):
    """This model cannot be served; the message names the file, and the field at fault."""


@dataclass
class ModelEntry:
    """One model of the repository, before any file is loaded: its folder, its config
    (empty without a config.pbtxt), its platform and the version files to serve, newest
    last."""

    name: str
    folder: Path
    config: Any
    platform: str
    versions: dict[int, Path] = field(default_factory=dict)
    # The config a load request gave in place of config.pbtxt, as it sent it.
    config_text: str | None = None

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def config_where(self) -> str:
        """Where the config came from, for messages: the file, or the load request."""
        if self.config_text is not None:
            return f"the load request's config of {self.name!r}"
        return str(self.config_path)


@dataclass
class Scan:
    """What a repository holds: the models to serve, and those set aside, with why."""

    models: list[ModelEntry]
    failed: dict[str, str]


def scan(root: Path, reserved: frozenset[str] = frozenset()) -> Scan:
    """Reads the repository at ``root``. Raises ModelLoadError only when ``root`` itself
    is not a folder; a model at fault is set aside in ``failed``. ``reserved`` are names
    the server's own routes and tasks take."""
    if not root.is_dir():
        raise ModelLoadError(f"MODEL_REPOSITORY={root} is not a folder: point it at one")
    models, failed = [], {}
    for folder in model_folders(root):
        try:
            if not _NAME.match(folder.name):
                raise ModelLoadError(
                    f"{folder}: a model's folder name must be letters, digits, '_', '.' or '-'"
                )
            if folder.name in reserved:
                raise ModelLoadError(
                    f"{folder}: the name {folder.name!r} is taken by a task or a route; rename it"
                )
            models.append(read_entry(folder))
        except ModelLoadError as exc:
            failed[folder.name] = str(exc)
    return Scan(models, failed)


def model_folders(root: Path) -> list[Path]:
    """The folders of the repository at ``root`` that hold a model each (hidden ones are
    not models), by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_entry(folder: Path, config_text: str | None = None) -> ModelEntry:
    """The model in ``folder``, with the versions its version policy serves. With
    ``config_text`` (a load request's JSON config), that config in place of its
    config.pbtxt."""
    entry = ModelEntry(folder.name, folder, None, "", config_text=config_text)
    where = entry.config_where
    try:
        on_disk = (
            read_config(entry.config_path)
            if entry.config_path.is_file()
            else messages().ModelConfig()
        )
        config = on_disk if config_text is None else parse_json_config(config_text, where)
    except ModelConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    if config_text is not None:
        _same_files(config, on_disk, where)
    if config.name and config.name != folder.name:
        raise ModelLoadError(
            f"{where}: field 'name' is {config.name!r} but the folder is {folder.name!r};"
            " they must agree"
        )
    platform = _platform(config, where)
    available = _version_folders(folder)
    if not available:
        raise ModelLoadError(
            f"{folder}: no version folder; put the model file in {folder}/1/"
            f"{config.default_model_filename or DEFAULT_FILES.get(platform, 'model.onnx')}"
        )
    entry.config, entry.platform = config, platform
    for version in _chosen(config, available, where):
        version_folder = folder / str(version)
        name = config.default_model_filename
        if not platform:
            platform = _platform_of_files(version_folder, where)
            entry.platform = platform
        name = name or DEFAULT_FILES[platform]
        path = version_folder / name
        if not path.is_file():
            raise ModelLoadError(f"{version_folder}: {name} is missing")
        entry.versions[version] = path
    return entry


def _same_files(config: Any, on_disk: Any, where: str) -> None:
    """A load request's config may not choose files: the model file and the labels files
    it names must be those that config.pbtxt names (nothing from a request becomes a
    path)."""
    if config.default_model_filename not in ("", on_disk.default_model_filename):
        raise ModelLoadError(
            f"{where}: field 'default_model_filename' differs from config.pbtxt's; a load"
            " request cannot choose files: set it in config.pbtxt"
        )
    labels = {output.name: output.label_filename for output in on_disk.output}
    for output in config.output:
        if output.label_filename and output.label_filename != labels.get(output.name):
            raise ModelLoadError(
                f"{where}: output {output.name!r} field 'label_filename' differs from"
                " config.pbtxt's; a load request cannot choose files: set it in config.pbtxt"
            )


def _platform(config: Any, where: str) -> str:
    """The platform the config names, or "" when it names none (the files decide)."""
    if config.platform and config.platform not in DEFAULT_FILES:
        raise ModelLoadError(
            f"{where}: field 'platform' is {config.platform!r}; this server serves"
            f" {', '.join(map(repr, DEFAULT_FILES))}"
        )
    if config.backend and config.backend not in _BACKENDS:
        raise ModelLoadError(
            f"{where}: field 'backend' is {config.backend!r}; this server serves"
            f" {', '.join(map(repr, _BACKENDS))}"
        )
    by_backend = _BACKENDS.get(config.backend, "")
    if config.platform and by_backend and by_backend != config.platform:
        raise ModelLoadError(
            f"{where}: 'platform' {config.platform!r} and 'backend' {config.backend!r}"
            " disagree; set one"
        )
    return str(config.platform or by_backend)


def _platform_of_files(version_folder: Path, where: str) -> str:
    found = [p for p, name in DEFAULT_FILES.items() if (version_folder / name).is_file()]
    if len(found) != 1:
        raise ModelLoadError(
            f"{version_folder}: expected model.onnx or model.pt"
            + (", not both: set 'platform' in " + where if found else "")
        )
    return found[0]


def _version_folders(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _chosen(config: Any, available: list[int], where: str) -> list[int]:
    """The versions ``version_policy`` serves (Triton's default: the newest one)."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        wanted = list(policy.specific.versions)
        missing = [v for v in wanted if v not in available]
        if missing or not wanted:
            raise ModelLoadError(
                f"{where}: version_policy.specific names version(s)"
                f" {missing or wanted} that have no folder; it has {available}"
            )
        return sorted(wanted)
    count = policy.latest.num_versions if choice == "latest" else 1
    if count < 1:
        raise ModelLoadError(f"{where}: version_policy.latest.num_versions must be >= 1")
    return available[-count:]
