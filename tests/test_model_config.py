"""config.pbtxt, read as Triton writes it: the fields a repository model may set, and a
message naming the file, line and field for one this server cannot serve."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from v2.model_config import ModelConfigError, parse_config, read_config

# As Triton's documentation writes an image classifier's configuration.
CONFIG = """
name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 2 } }
input [
  {
    name: "input"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
dynamic_batching {
  preferred_batch_size: [ 8, 16 ]
  max_queue_delay_microseconds: 5000
  default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 2000000 }
}
parameters: { key: "mean" value: { string_value: "0.485,0.456,0.406" } }
instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]
"""


def test_a_tritons_config_reads_as_written() -> None:
    config = parse_config(CONFIG)
    assert config.name == "classifier"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert config.version_policy.latest.num_versions == 2
    [tensor] = config.input
    assert (tensor.name, list(tensor.dims)) == ("input", [3, 224, 224])
    assert config.output[0].label_filename == "labels.txt"
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.default_queue_policy.default_timeout_microseconds == 2_000_000
    assert config.parameters["mean"].string_value == "0.485,0.456,0.406"
    [group] = config.instance_group
    assert (group.count, group.kind, list(group.gpus)) == (2, group.KIND_GPU, [0])


def test_it_is_wire_compatible_with_tritons_own_definition() -> None:
    ours = parse_config(CONFIG)
    theirs = model_config_pb2.ModelConfig.FromString(ours.SerializeToString())
    assert text_format.MessageToString(theirs) == text_format.MessageToString(ours)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'name: "m"\nmax_batch_sise: 8',
            ":2: unknown field 'max_batch_sise' in ModelConfig; did you mean 'max_batch_size'?",
        ),
        (
            'input [ { name: "x" data_typ: TYPE_FP32 } ]',
            "unknown field 'data_typ' in ModelInput; did you mean 'data_type'?",
        ),
        (
            'instance_group [ { count: 2 kind: KIND_CPU host_policy: "numa0" } ]',
            "field 'host_policy' of Triton's model configuration is not supported",
        ),
        (
            "optimization { graph { level: 1 } }",
            "field 'optimization' of Triton's model configuration is not supported",
        ),
        ('max_batch_size: "eight"', "Couldn't parse integer"),
    ],
)
def test_a_field_it_cannot_serve_is_named_with_its_line(text: str, expected: str) -> None:
    with pytest.raises(ModelConfigError, match=r"^model/config\.pbtxt") as raised:
        parse_config(text, "model/config.pbtxt")
    assert expected in str(raised.value)


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ModelConfigError, match="cannot be read"):
        read_config(path)
    path.write_text(CONFIG)
    assert read_config(path).name == "classifier"
