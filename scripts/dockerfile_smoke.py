"""Reproduces the Dockerfile without Docker: its ENV, COPY and `RUN pip install` steps in
a fresh virtualenv, then its CMD, then a real /cls request. A dependency or file the
image would miss fails here instead of on a user's GPU host.

    python scripts/dockerfile_smoke.py
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            steps.append((keyword.upper(), rest.strip()))
    return steps


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="dockerfile-smoke-"))
    app_dir, venv = work / "app", work / "venv"
    app_dir.mkdir()
    print(f"reproducing the Dockerfile in {work}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "HOME": str(work)}
    command: list[str] = []
    for keyword, args in instructions(ROOT / "Dockerfile"):
        if keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
        elif keyword == "COPY":
            *sources, destination = shlex.split(args)
            for source in sources:
                target = app_dir / destination if destination not in ("./", ".") else app_dir
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, app_dir / destination, dirs_exist_ok=True)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
        elif keyword == "RUN" and args.startswith("pip install"):
            print(f"RUN {args}", flush=True)
            subprocess.run(shlex.split(args), cwd=app_dir, env=env, check=True)
        elif keyword == "CMD":
            command = json.loads(args)
    port = free_port()
    # The container binds 0.0.0.0; here the server stays on loopback.
    env.update({"BIND": f"127.0.0.1:{port}", "HOST": "127.0.0.1", "PORT": str(port)})
    print(f"CMD {command} on 127.0.0.1:{port}", flush=True)
    server = subprocess.Popen(command, cwd=app_dir, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                print("the server exited during startup", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    print("the server never became ready", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        result = subprocess.run(
            [
                "curl",
                "-sf",
                "-F",
                f"file=@{ROOT / 'tests/data/chelsea.jpg'}",
                f"http://127.0.0.1:{port}/cls",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        label = json.loads(result.stdout)["prediction"]["label"]
        print(f"POST /cls -> {label}", flush=True)
        if label not in ("Egyptian cat", "tiger cat"):
            return 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/web/page.js", timeout=5) as page:
            print(f"GET /web/page.js -> {page.status}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    print(f"gunicorn exited with {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
