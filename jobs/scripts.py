"""The Redis job store's Lua scripts (jobs/lua/), called with named arguments.

Each script's arguments are a dataclass below: its fields are what the script reads as
``A.<field>`` (strings, as Redis passes them), and ``tail`` holds a list of any length,
which the script reads from ``ARGV[TAIL]`` on. Every script also gets the shared keys (see
common.lua), the store's limits, and the job statuses and final events as
jobs/models.py defines them, so that no name is written twice.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from jobs.models import FINAL_EVENT, LIVE_STATUSES, JobStatus

_LUA = Path(__file__).with_name("lua")


@dataclass(frozen=True)
class Script:
    """The arguments of the script named ``name`` (jobs/lua/{name}.lua)."""

    name: ClassVar[str]

    def args(self) -> list[Any]:
        fields = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tail"]
        return fields + list(getattr(self, "tail", ()))

    @classmethod
    def prelude(cls) -> str:
        """Lua that names this script's arguments: ``A.<field>``, and ``TAIL``, the index in
        ARGV where ``tail`` starts."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "tail"]
        fields = ", ".join(f"{name} = ARGV[{i}]" for i, name in enumerate(names, 1))
        return f"local A = {{{fields}}}\nlocal TAIL = {len(names) + 1}\n"


@dataclass(frozen=True)
class Create(Script):
    """Stores a job whose inputs were written to its data hash beforehand, unless the
    limits refuse it or its idempotency key names another job. ``tail``: the input
    indexes, then index, error-result pairs for the items that could not be read."""

    name = "create"
    prefix: str
    id: str
    total: int
    now: str
    max_jobs: int
    max_items: int
    max_bytes: int
    ttl: int
    idem: str  # the idempotency key's Redis key, '' for none
    nbytes: int
    task: str
    digest: str
    nimages: int
    tail: Sequence[Any] = ()


@dataclass(frozen=True)
class Take(Script):
    """Up to ``count`` new items with their inputs, never blocking."""

    name = "take"
    prefix: str
    group: str
    consumer: str
    count: int


@dataclass(frozen=True)
class Begin(Script):
    """Marks a queued job running; 1 if the job is live."""

    name = "begin"
    prefix: str
    id: str
    now: str


@dataclass(frozen=True)
class Record(Script):
    """Records an item's result once and acknowledges its delivery."""

    name = "record"
    prefix: str
    id: str
    index: int
    result: str  # JSON
    ok: int  # 1 or 0
    now: str
    ttl: int
    entry: str
    group: str


@dataclass(frozen=True)
class Cancel(Script):
    """Ends a live job as cancelled; the job's status afterwards, or nil."""

    name = "cancel"
    prefix: str
    id: str
    now: str
    ttl: int


@dataclass(frozen=True)
class Remove(Cancel):
    """Cancels a live job, then deletes every trace of it; its status before, or nil."""

    name = "remove"


@dataclass(frozen=True)
class Release(Script):
    """Puts items back at the end of the work stream. ``tail``: entry id, job id, index,
    task quadruples."""

    name = "release"
    group: str
    tail: Sequence[Any] = ()


SCRIPTS: tuple[type[Script], ...] = (Create, Take, Begin, Record, Cancel, Remove, Release)


def source(script: type[Script], max_finished_bytes: int, job_kept_bytes: int) -> str:
    """The Lua that Redis runs for ``script``: the shared definitions, then the script."""
    statuses = "\n".join(f"local {status.name} = '{status.value}'" for status in JobStatus)
    final = ", ".join(f"{status.value} = '{event}'" for status, event in FINAL_EVENT.items())
    live = " or ".join(f"status == {status.name}" for status in sorted(LIVE_STATUSES))
    return (
        f"local MAX_FINISHED_BYTES = {max_finished_bytes}\n"
        f"local JOB_KEPT_BYTES = {job_kept_bytes}\n"
        f"{statuses}\n"
        f"local FINAL_EVENT = {{{final}}}\n"
        f"local function is_live(status)\n  return {live}\nend\n"
        + script.prelude()
        + (_LUA / "common.lua").read_text()
        + (_LUA / f"{script.name}.lua").read_text()
    )
