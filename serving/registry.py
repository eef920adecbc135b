"""Reads TASKS: which task classes this server runs."""

import importlib

from serving.task import Task, check_task

DEFAULT_TASKS = "classification.task:ImageClassification"

# Names the server's own routes already use.
RESERVED = frozenset(
    {"jobs", "health", "metadata", "metrics", "docs", "redoc", "openapi", "v2", "web"}
)


def _tasks_in(module: object) -> str:
    """The Task subclasses a module defines, as a TASKS entry would name them."""
    names = [
        f"{value.__module__}:{name}"
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, Task)
        and value is not Task
        and value.__module__ == getattr(module, "__name__", None)
    ]
    return ", ".join(sorted(names))


def load_tasks(spec: str, *, allow_empty: bool = False) -> list[Task[object, object]]:
    """One instance of each class in ``spec`` (``package.module:Class``, comma-separated).

    Raises ValueError naming TASKS and the entry at fault: an import that fails, a class
    that does not implement the interface, a name taken twice or by a built-in route; and
    ConfigError naming the variable when a task's own settings hold a bad value.
    """
    tasks: list[Task[object, object]] = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        module_name, colon, class_name = entry.partition(":")
        if not colon or not module_name or not class_name:
            raise ValueError(f"TASKS entry {entry!r} must look like package.module:Class")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"TASKS entry {entry!r}: cannot import {module_name}: {exc}") from exc
        task_class = getattr(module, class_name, None)
        if task_class is None:
            raise ValueError(
                f"TASKS entry {entry!r}: {module_name} has no {class_name};"
                f" its tasks are {_tasks_in(module) or 'none'}"
            )
        check_task(task_class, entry)
        name = task_class.name
        if name in RESERVED:
            raise ValueError(f"TASKS entry {entry!r}: the name {name!r} is a built-in route")
        if any(task.name == name for task in tasks):
            raise ValueError(f"TASKS names {name!r} twice; each task needs its own name")
        task = task_class()
        task.settings  # noqa: B018 -- read now, so that a bad value stops startup
        tasks.append(task)
    if not tasks and not allow_empty:
        raise ValueError(
            "TASKS is empty: name at least one package.module:Class, or set MODEL_REPOSITORY"
        )
    return tasks
