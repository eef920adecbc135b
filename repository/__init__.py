"""Models served from files, with no code: MODEL_REPOSITORY, a folder in Triton's layout
(layout.py), each model's configuration (config.py), what runs its file (runners.py),
and each version served as a task (model.py)."""

from pathlib import Path

from repository.layout import ModelLoadError, scan
from repository.model import RepositoryModel


def repository_models(
    root: Path, reserved: frozenset[str]
) -> tuple[list[RepositoryModel], dict[str, str]]:
    """A task for each version to serve of each model in ``root``, and the models set
    aside, with why."""
    found = scan(root, reserved)
    models = [
        RepositoryModel.for_version(entry, version)
        for entry in found.models
        for version in entry.versions
    ]
    return models, found.failed


__all__ = ["ModelLoadError", "RepositoryModel", "repository_models"]
