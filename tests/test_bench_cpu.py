"""The benchmark's measure of a server's CPU: every process of its group, and the CPU per
answer of a level's runs taken together (bench/loadgen.py, bench/servers.py)."""

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from loadgen import cpu_seconds  # noqa: E402
from servers import server_cpu  # noqa: E402

# A parent that idles while the child it starts burns CPU: a server whose work is done
# by its worker processes.
BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"
PARENT = (
    "import subprocess, sys\n"
    "subprocess.run([sys.executable, '-c', sys.argv[1]], check=True)\n"
    "print('done', flush=True)\n"
    "sys.stdin.read()\n"  # stays alive until the test closes stdin
)


def test_a_server_s_cpu_includes_the_processes_of_its_group() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, BURN.format(seconds=0.6)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as bench/servers.py starts every server
    )
    try:
        before = cpu_seconds(parent.pid)
        started = time.monotonic()
        while cpu_seconds(parent.pid) - before < 0.3:  # the child's CPU, while it runs
            assert time.monotonic() - started < 30, "the child's CPU time was never counted"
            assert parent.poll() is None
        assert parent.stdout is not None
        assert parent.stdout.readline() == "done\n"
    finally:
        parent.communicate("")
    assert cpu_seconds(parent.pid) == 0  # a process that is gone counts nothing


def test_a_level_s_server_cpu_is_taken_over_its_runs() -> None:
    runs = [
        {"server_cpu_in_window_s": 1.5, "answered_in_window": {"200": 100, "503": 4}},
        {"server_cpu_in_window_s": 0.5, "answered_in_window": {"200": 100}},
    ]
    assert server_cpu(runs) == {
        "server_cpu_in_window_s": 2.0,
        "answered_in_window": {"200": 200, "503": 4},
        "server_cpu_ms_per_200": 10.0,
    }
    assert server_cpu([*runs, {"answered_in_window": {}}]) == {}  # one run did not measure
    refused = [{"server_cpu_in_window_s": 1.0, "answered_in_window": {"503": 50}}]
    assert server_cpu(refused)["server_cpu_ms_per_200"] is None
