"""The Dockerfile and compose files agree with the settings, config and routes.

No Docker engine runs here; scripts/dockerfile_smoke.py (make docker-check) replays the
Dockerfile's install steps and CMD in a virtualenv instead.
"""

import ast
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from main import create_app
from scripts.dockerfile_smoke import instructions
from settings import Settings
from tests.helpers import EVERY_SETTING

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = EVERY_SETTING
DOCKERFILE = instructions(ROOT / "Dockerfile")


class ComposeLoader(yaml.SafeLoader):
    """Also reads compose's ``!reset`` tag, which drops a value from the base file."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def compose(name: str, service: str = "classifier") -> dict:  # type: ignore[type-arg]
    text = (ROOT / name).read_text()
    return yaml.load(text, Loader=ComposeLoader)["services"][service]


def routes() -> set[str]:
    return set(create_app(Settings()).openapi()["paths"])


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_every_compose_environment_key_is_a_setting(name: str) -> None:
    keys = set(compose(name)["environment"])
    assert keys, name
    unknown = {key for key in keys if key.upper() not in SETTINGS}
    assert not unknown, f"{name} sets {unknown}, which no setting reads"


def test_compose_exposes_every_setting() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    missing = {name for name in SETTINGS if not re.search(rf"\b{name}\b", text, re.IGNORECASE)}
    assert not missing, f"docker-compose.yml does not mention {missing}"


def test_compose_reserves_a_gpu_publishes_http_and_grpc_and_restarts() -> None:
    service = compose("docker-compose.yml")
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert service["ports"] == ["5001:5001", "5002:5002"]
    assert service["environment"]["GRPC_PORT"] == "5002"
    assert service["restart"] == "unless-stopped"
    assert service["environment"]["timeout"] == "2.0"
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])
    assert "/health/ready" in routes()
    # Docker must not SIGKILL before gunicorn's own graceful timeout has run out.
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > int(service["environment"]["GRACEFUL_TIMEOUT"])


def test_compose_environment_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in compose("docker-compose.yml")["environment"].items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.gunicorn_bind == "0.0.0.0:5001"


def test_dockerfile_cmd_runs_gunicorn_with_the_config() -> None:
    [cmd] = [json.loads(args) for keyword, args in DOCKERFILE if keyword == "CMD"]
    assert cmd == ["gunicorn", "main:app", "-c", "gunicorn_config.py"]


def test_dockerfile_healthcheck_probes_readiness_on_the_served_port() -> None:
    [health] = [args for keyword, args in DOCKERFILE if keyword == "HEALTHCHECK"]
    env = dict(
        pair.split("=", 1)
        for keyword, args in DOCKERFILE
        if keyword == "ENV"
        for pair in shlex.split(args)
    )
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", health)
    assert url is not None, health
    assert url.group(1) == env["PORT"] == "5001"
    assert url.group(2) == "/health/ready"
    assert url.group(2) in routes()
    assert env["HOST"] == "0.0.0.0"
    assert ("EXPOSE", "5001 5002") in DOCKERFILE
    assert env["GRPC_PORT"] == "5002"


def test_dockerfile_runs_as_non_root_and_caches_dependencies_before_code() -> None:
    keywords = [keyword for keyword, _ in DOCKERFILE]
    assert DOCKERFILE[0][1].startswith("python:3.11-slim")
    assert "USER" in keywords
    assert [args for k, args in DOCKERFILE if k == "USER"] != ["root"]
    install = keywords.index("RUN")
    first_code = next(
        i for i, (k, args) in enumerate(DOCKERFILE) if k == "COPY" and "main.py" in args
    )
    assert install < first_code


def test_the_image_user_has_a_home_and_a_writable_torch_home() -> None:
    """torchvision downloads weights under TORCH_HOME (default ~/.cache/torch): without a
    home the app user could not cache a MODEL given without WEIGHTS."""
    [useradd] = [args for k, args in DOCKERFILE if k == "RUN" and "useradd" in args]
    assert "--create-home" in useradd
    assert "--no-create-home" not in useradd
    env = dict(
        pair.split("=", 1) for k, args in DOCKERFILE if k == "ENV" for pair in shlex.split(args)
    )
    torch_home = PurePosixPath(env["TORCH_HOME"])
    owned = re.search(r"chown -R app (\S+)", useradd)
    assert owned is not None
    assert torch_home.is_relative_to(owned.group(1))
    assert f"mkdir -p {torch_home}" in useradd


def test_dockerfile_copies_every_module_the_app_imports() -> None:
    copied: set[str] = set()
    for keyword, args in DOCKERFILE:
        if keyword == "COPY":
            copied.update(source.rstrip("/") for source in shlex.split(args)[:-1])
    local = {p.stem for p in ROOT.glob("*.py")} | {
        p.parent.name for p in ROOT.glob("*/__init__.py")
    }
    needed: set[str] = set()
    for source in copied:
        files = [ROOT / source] if source.endswith(".py") else list((ROOT / source).rglob("*.py"))
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    needed.add(node.module.split(".")[0])
                elif isinstance(node, ast.Import):
                    needed.update(alias.name.split(".")[0] for alias in node.names)
    missing = {name for name in needed & local if name not in copied and f"{name}.py" not in copied}
    assert not missing, f"the image imports {missing} but the Dockerfile does not copy them"


def test_the_scale_overlay_runs_redis_durably_behind_haproxy() -> None:
    overlay = "docker-compose.scale.yml"
    classifier = compose(overlay)
    assert set(classifier["environment"]) <= SETTINGS
    assert classifier["environment"]["JOB_STORE"] == "redis"
    assert classifier["deploy"]["replicas"] >= 2
    assert classifier["ports"] is None  # only the balancer publishes the port
    redis_command = compose(overlay, "redis")["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data:/data" in compose(overlay, "redis")["volumes"]
    balancer = compose(overlay, "lb")
    config = balancer["volumes"][0].split(":")[0]
    assert (ROOT / config).is_file()
    assert "option httpchk GET /health/ready" in (ROOT / config).read_text()
    assert balancer["ports"] == ["5001:5001", "5002:5002"]  # HTTP, gRPC
