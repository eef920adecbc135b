"""The Redis job store's scripts read their arguments by the names jobs/scripts.py gives
them, and the statuses as jobs/models.py defines them."""

import dataclasses
import re
from pathlib import Path

import pytest

from jobs import scripts
from jobs.models import JobStatus

LUA = Path(scripts.__file__).with_name("lua")


@pytest.mark.parametrize("script", scripts.SCRIPTS, ids=lambda s: s.name)
def test_a_script_reads_only_the_arguments_it_declares(script: type[scripts.Script]) -> None:
    text = (LUA / f"{script.name}.lua").read_text()
    declared = {f.name for f in dataclasses.fields(script)} - {"tail"}
    read = set(re.findall(r"\bA\.(\w+)", text))
    assert read <= declared, f"{script.name}.lua reads {read - declared}, never passed"
    assert not re.search(r"ARGV\[\d+\]", text), "read arguments by name (A.<field>)"
    if "tail" not in {f.name for f in dataclasses.fields(script)}:
        assert "TAIL" not in text


def test_arguments_go_in_declared_order_then_the_tail() -> None:
    release = scripts.Release("replicas", ["1-0", "job", 3, "cls"])
    assert release.args() == ["replicas", "1-0", "job", 3, "cls"]
    assert "local A = {group = ARGV[1]}\nlocal TAIL = 2\n" in scripts.Release.prelude()
    begin = scripts.Begin(prefix="p", id="j", now="t")
    assert begin.args() == ["p", "j", "t"]


def test_statuses_are_written_once() -> None:
    source = scripts.source(scripts.Cancel, 1, 1)
    for status in JobStatus:
        assert f"local {status.name} = '{status.value}'" in source
    # 'failed' is also the name of a counter in the job's hash, so it may stay quoted.
    for path in LUA.glob("*.lua"):
        for status in set(JobStatus) - {JobStatus.FAILED}:
            assert f"'{status.value}'" not in path.read_text(), (path.name, status)
