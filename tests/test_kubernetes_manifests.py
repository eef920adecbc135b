"""deploy/kubernetes, checked offline: what the manifests promise agrees with the server."""

from typing import Any

import pytest
import yaml

from harness.server import ROOT
from jobs.redis_base import GROUP
from settings import Settings

DIRECTORY = ROOT / "deploy" / "kubernetes"


def documents() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((DIRECTORY / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((DIRECTORY / name).read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(document), name
            found[document["kind"], document["metadata"]["name"]] = document
    return found


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    return documents()


def container(manifests: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    spec = manifests["Deployment", "classifier"]["spec"]["template"]["spec"]
    (main,) = spec["containers"]
    return dict(main)


def test_every_file_is_listed_in_the_kustomization() -> None:
    listed = yaml.safe_load((DIRECTORY / "kustomization.yaml").read_text())["resources"]
    on_disk = {path.name for path in DIRECTORY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


def test_the_environment_is_real_settings(manifests: dict[tuple[str, str], Any]) -> None:
    env = {item["name"]: item["value"] for item in container(manifests)["env"]}
    fields = {name.upper() for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    settings = Settings(**{name.lower(): value for name, value in env.items()})
    assert settings.job_store == "redis"
    assert settings.redis_url.startswith("redis://redis:6379")


def test_probes_and_port_match_the_server(manifests: dict[tuple[str, str], Any]) -> None:
    main = container(manifests)
    env = {item["name"]: item["value"] for item in main["env"]}
    port = int(env["BIND"].rsplit(":", 1)[1])
    grpc_port = int(env["GRPC_PORT"])
    assert main["ports"] == [
        {"name": "http", "containerPort": port},
        {"name": "grpc", "containerPort": grpc_port},
    ]
    assert main["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert main["startupProbe"]["httpGet"]["path"] == "/health/live"
    service = manifests["Service", "classifier"]["spec"]
    assert [p["targetPort"] for p in service["ports"]] == ["http", "grpc"]
    assert (
        service["selector"]
        == manifests["Deployment", "classifier"]["spec"]["selector"]["matchLabels"]
    )


def test_the_grace_period_fits_the_shutdown_ordering(
    manifests: dict[tuple[str, str], Any],
) -> None:
    main = container(manifests)
    env = {item["name"].lower(): item["value"] for item in main["env"]}
    settings = Settings(**env)  # refuses a GRACEFUL_TIMEOUT shorter than the drain
    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = float(pre_stop[-1].rsplit("(", 1)[1].rstrip(")"))
    grace = manifests["Deployment", "classifier"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert pre_stop_s + settings.graceful_timeout < grace


def test_redis_keeps_its_data_and_never_evicts(manifests: dict[tuple[str, str], Any]) -> None:
    redis = manifests["StatefulSet", "redis"]["spec"]
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert ("Service", "redis") in manifests


def test_autoscaling_watches_the_stream_the_replicas_read(
    manifests: dict[tuple[str, str], Any],
) -> None:
    scaled = manifests["ScaledObject", "classifier"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "classifier"
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["stream"] == f"{Settings().redis_prefix}:work"
    assert trigger["metadata"]["consumerGroup"] == GROUP
