"""MODEL_REPOSITORY read and loaded in this process, from real exports: the layout and
version policies, configs checked against the files or derived from them, and each model
computing what the module computes directly."""

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from repository import RepositoryModel, repository_models
from repository.layout import ModelLoadError, read_entry, scan
from serving.task import InputError, LoadContext
from tests.repository_models import (
    TWO_BY_TWO_CONFIG,
    TwoByTwo,
    export_onnx,
    image_model,
    onnx_model,
    torchscript_model,
)
from v2.model_config import parse_config


def loaded(root: Path, name: str, version: int | None = None, threads: int = 1) -> RepositoryModel:
    models, failed = repository_models(root, frozenset())
    assert name not in failed, failed[name]
    [model] = [
        m for m in models if m.name == name and (version is None or m.version == str(version))
    ]
    model.load(LoadContext(device="cpu", threads=threads, cache_dir=Path(".model-cache")))
    return model


def load_error(root: Path, name: str) -> str:
    with pytest.raises(ModelLoadError) as caught:
        loaded(root, name)
    return str(caught.value)


def rows(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    return (
        generator.standard_normal((count, 4), dtype=np.float32),
        generator.standard_normal((count, 4), dtype=np.float32),
    )


def test_a_model_without_a_version_folder_is_set_aside_naming_the_folder(tmp_path: Path) -> None:
    onnx_model(tmp_path, "good", config=True, versions={1: 1.0})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"')
    found = scan(tmp_path)
    assert [entry.name for entry in found.models] == ["good"]
    assert "empty: no version folder" in found.failed["empty"]
    assert "empty/1/model.onnx" in found.failed["empty"]


def test_a_config_with_a_typo_names_the_file_the_line_and_the_field_meant(tmp_path: Path) -> None:
    onnx_model(tmp_path, "typo", config=True, versions={1: 1.0})
    config = tmp_path / "typo" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_sise"))
    reason = scan(tmp_path).failed["typo"]
    assert f"{config}:4:" in reason  # the line of max_batch_size
    assert "'max_batch_sise'" in reason
    assert "did you mean 'max_batch_size'" in reason


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", [3]),
        ("version_policy: { latest: { num_versions: 2 } }", [2, 3]),
        ("version_policy: { specific: { versions: [1, 3] } }", [1, 3]),
        ("version_policy: { all: {} }", [1, 2, 3]),
    ],
)
def test_the_version_policy_chooses_the_versions_served(
    tmp_path: Path, policy: str, served: list[int]
) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0, 2: 2.0, 3: 3.0})
    config = tmp_path / "m" / "config.pbtxt"
    config.write_text(config.read_text() + policy)
    [entry] = scan(tmp_path).models
    assert list(entry.versions) == served


def test_a_specific_version_without_a_folder_is_named(tmp_path: Path) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    config = tmp_path / "m" / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { specific: { versions: [4] } }")
    assert "version(s) [4] that have no folder; it has [1]" in scan(tmp_path).failed["m"]


def test_a_config_naming_another_model_is_refused(tmp_path: Path) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    config = tmp_path / "m" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "m"', 'name: "other"'))
    assert "field 'name' is 'other' but the folder is 'm'" in scan(tmp_path).failed["m"]


def test_a_corrupt_onnx_file_fails_its_load_naming_the_file(tmp_path: Path) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    path = tmp_path / "m" / "1" / "model.onnx"
    path.write_bytes(path.read_bytes()[:300])
    reason = load_error(tmp_path, "m")
    assert f"ONNX Runtime cannot load {path}" in reason


def test_a_declared_shape_that_contradicts_the_file_names_the_input_and_field(
    tmp_path: Path,
) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    config = tmp_path / "m" / "config.pbtxt"
    config.write_text(
        config.read_text().replace(
            'name: "b" data_type: TYPE_FP32 dims: [ 4 ]',
            'name: "b" data_type: TYPE_FP32 dims: [ 5 ]',
        )
    )
    reason = load_error(tmp_path, "m")
    assert reason == (
        f"{config}: input 'b' field 'dims' is [5]; model.onnx has [4]"
        " (after the batch dimension; -1 is any size)"
    )


def test_a_declared_datatype_that_contradicts_the_file_is_named(tmp_path: Path) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    config = tmp_path / "m" / "config.pbtxt"
    text = config.read_text().replace(
        'name: "sum" data_type: TYPE_FP32', 'name: "sum" data_type: TYPE_INT64'
    )
    config.write_text(text)
    assert "output 'sum' field 'data_type' is TYPE_INT64; model.onnx has FP32" in load_error(
        tmp_path, "m"
    )


def test_without_a_config_the_inputs_outputs_and_batching_come_from_the_file(
    tmp_path: Path,
) -> None:
    onnx_model(tmp_path, "derived", config=False, versions={1: 1.0})
    model = loaded(tmp_path, "derived")
    config = model.model_config()
    assert config["name"] == "derived"
    assert config["input"] == [
        {"name": "a", "data_type": "TYPE_FP32", "dims": [4]},
        {"name": "b", "data_type": "TYPE_FP32", "dims": [4]},
    ]
    assert [o["name"] for o in config["output"]] == ["sum", "mixed"]
    assert [o["dims"] for o in config["output"]] == [[4], [3]]
    form = model.tensor_form()
    assert [(s.name, s.datatype, s.shape) for s in form.inputs] == [
        ("a", "FP32", (-1, 4)),
        ("b", "FP32", (-1, 4)),
    ]


def test_a_torchscript_model_needs_a_config(tmp_path: Path) -> None:
    torchscript_model(tmp_path, "scripted")
    (tmp_path / "scripted" / "config.pbtxt").unlink()
    (tmp_path / "scripted" / "config.pbtxt").write_text('platform: "pytorch_libtorch"')
    assert "a TorchScript model needs 'input' and 'output' declared" in load_error(
        tmp_path, "scripted"
    )


@pytest.mark.parametrize("kind", ["onnx", "torchscript"])
def test_a_batch_computes_what_the_module_computes_directly(tmp_path: Path, kind: str) -> None:
    if kind == "onnx":
        onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    else:
        torchscript_model(tmp_path, "m")
    model = loaded(tmp_path, "m")
    a, b = rows(5)
    items = [
        model.decode({"a": a[i].tolist(), "b": b[i].tolist()}, model.Options()) for i in range(5)
    ]
    results = model.predict_batch(items)
    total, mixed = TwoByTwo().expected(a, b)
    for i, result in enumerate(results):
        assert isinstance(result, dict)
        np.testing.assert_allclose(result["sum"], total[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result["mixed"], mixed[i], rtol=1e-5, atol=1e-5)


def test_a_row_of_the_wrong_shape_or_missing_an_input_is_refused_naming_it(tmp_path: Path) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    model = loaded(tmp_path, "m")
    with pytest.raises(
        InputError, match=r"input 'b' has shape \[3\] in one row; the model takes \[4\]"
    ):
        model.decode({"a": [1, 2, 3, 4], "b": [1, 2, 3]}, model.Options())
    with pytest.raises(InputError, match="input 'b' is missing"):
        model.decode({"a": [1, 2, 3, 4]}, model.Options())
    with pytest.raises(InputError, match="does not hold FP32 values"):
        model.decode({"a": [1, 2, 3, 4], "b": ["x", 2, 3, 4]}, model.Options())
    with pytest.raises(InputError) as caught:
        model.decode(b"\xff\xd8 an image", model.Options())
    assert caught.value.status == 415


def test_the_config_sets_the_models_own_batching_and_queue_limits(tmp_path: Path) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    config = tmp_path / "m" / "config.pbtxt"
    config.write_text(
        config.read_text().replace(
            "dynamic_batching { max_queue_delay_microseconds: 2000 }",
            "dynamic_batching { max_queue_delay_microseconds: 2000 default_queue_policy:"
            " { default_timeout_microseconds: 500000 max_queue_size: 7 } }",
        )
    )
    overrides = loaded(tmp_path, "m").serving_overrides()
    assert (overrides.max_batch_size, overrides.max_batch_delay_ms) == (16, 2.0)
    assert (overrides.timeout, overrides.max_queue_size) == (0.5, 7)


def test_an_unknown_image_parameter_is_named(tmp_path: Path) -> None:
    folder = image_model(tmp_path, Path(".model-cache"))
    config = folder / "config.pbtxt"
    config.write_text(config.read_text().replace('"image_mean"', '"image_mena"'))
    assert "unknown parameter 'image_mena'" in load_error(tmp_path, folder.name)


def test_a_labels_file_of_the_wrong_length_is_named(tmp_path: Path) -> None:
    folder = image_model(tmp_path, Path(".model-cache"))
    labels = folder / "labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:999]))
    assert f"{labels}: 999 labels for output 'output' of 1000 classes" in load_error(
        tmp_path, folder.name
    )


def test_the_tensor_config_text_used_here_parses(tmp_path: Path) -> None:
    # The template the e2e tests share: a typo in it would fail them all at once.
    export_onnx(TwoByTwo(), tmp_path / "m" / "1" / "model.onnx")
    text = TWO_BY_TWO_CONFIG.format(name="m", platform="onnxruntime_onnx")
    (tmp_path / "m" / "config.pbtxt").write_text(text)
    assert scan(tmp_path).failed == {}


def test_onnx_models_run_on_the_cpu_unless_onnxruntime_has_cuda(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import onnxruntime

    from classification.onnx_backend import providers_for

    assert providers_for("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert providers_for("cuda")[0] == "CUDAExecutionProvider"
    else:  # this machine's onnxruntime: the CPU, and a warning that says why
        assert providers_for("cuda") == ["CPUExecutionProvider"]
        assert "install onnxruntime-gpu" in caplog.text


def test_instance_groups_choose_the_device_and_the_batches_at_once(tmp_path: Path) -> None:
    onnx_model(tmp_path, "m", config=True, versions={1: 1.0})
    config = tmp_path / "m" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text + "instance_group [ { count: 1 kind: KIND_CPU } ]\n")
    model = loaded(tmp_path, "m", threads=2)
    assert model.concurrency() == 1  # one instance: one batch at a time, on every thread
    config.write_text(text + "instance_group [ { count: 2 kind: KIND_CPU } ]\n")
    assert loaded(tmp_path, "m", threads=2).concurrency() == 2
    config.write_text(text + "instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]\n")
    assert (
        f"{config}: instance_group asks for KIND_GPU but this server computes on cpu"
        in load_error(tmp_path, "m")
    )


def test_a_load_requests_config_replaces_the_file_but_cannot_choose_files(
    tmp_path: Path,
) -> None:
    folder = image_model(tmp_path, Path(".model-cache"))
    on_disk = parse_config((folder / "config.pbtxt").read_text())
    given = json_format.MessageToDict(on_disk, preserving_proto_field_name=True)
    given["max_batch_size"] = 4
    entry = read_entry(folder, json.dumps(given))
    assert entry.config.max_batch_size == 4
    assert entry.config_where == f"the load request's config of {folder.name!r}"
    # The labels named in config.pbtxt are read; a request naming another file is refused.
    given["output"][0]["label_filename"] = "../../../etc/passwd"
    with pytest.raises(ModelLoadError, match=r"'label_filename' differs from config\.pbtxt's"):
        read_entry(folder, json.dumps(given))
    with pytest.raises(ModelLoadError, match="'default_model_filename' differs"):
        read_entry(folder, json.dumps({"default_model_filename": "/etc/hostname"}))
    with pytest.raises(ModelLoadError, match=r"the load request's config .* did you mean"):
        read_entry(folder, '{"max_batch_sise": 4}')
