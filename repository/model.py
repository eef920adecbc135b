"""One version of a repository model, served as a task: its own batcher, admission,
metrics, readiness, ``POST /{name}`` and the Open Inference Protocol.

An image model (one whose config declares ``image_resize``) takes an encoded image, as
``/cls`` does: a multipart upload, ``{"image": "<base64>"}``, or over V2 one BYTES element
per row; its labelled output answers ``POST /{name}`` with the top classes. Any other
model takes its inputs as tensors: over V2, or as ``POST /{name}`` with a JSON object of
one row's values by input name.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from google.protobuf import json_format
from pydantic import BaseModel, Field

from classification import decode
from classification.building import SAMPLE_IMAGE
from classification.images import IMAGE_JSON_SCHEMA, image_text, read_image
from classification.settings import ImageInputSettings
from classification.task import Classification, ClassPrediction
from repository.config import Resolved, resolve
from repository.layout import ONNX, ModelEntry, ModelLoadError
from repository.runners import OnnxRunner, Runner, TorchScriptRunner
from serving.task import InputError, LoadContext, Payload, ServingOverrides, Task
from serving.tensors import DATATYPES, Row, TensorForm, TensorSpec, only_bytes
from serving.warmup import batch_shapes, fastest, tune_batch_size
from v2.stubs import messages

Item = np.ndarray | dict[str, np.ndarray]
Result = dict[str, np.ndarray]


class RepositoryOptions(BaseModel):
    top_k: int | None = Field(None, ge=1, le=1000, description="Classes to return")


class RepositoryModel(Task[Item, Result]):
    """A model file of MODEL_REPOSITORY. ``for_version`` makes the class of one version."""

    Settings = ImageInputSettings
    Options = RepositoryOptions
    entry: ClassVar[ModelEntry]
    version_number: ClassVar[int]
    settings: ImageInputSettings
    resolved: Resolved

    @classmethod
    def for_version(cls, entry: ModelEntry, version: int) -> "RepositoryModel":
        """The task serving ``version`` of ``entry``."""
        config = entry.config
        image = "image_resize" in config.parameters
        labelled = any(output.label_filename for output in config.output)
        attributes: dict[str, Any] = {
            "name": entry.name,
            "version": str(version),
            "entry": entry,
            "version_number": version,
            "__doc__": f"Model {entry.name!r} of the repository, version {version}.",
        }
        if image:
            attributes |= {"jobs_field": "images", "json_schema": IMAGE_JSON_SCHEMA}
            if labelled:
                attributes["Response"] = Classification
        subclass = type(f"RepositoryModel_{entry.name}_{version}", (cls,), attributes)
        return subclass()  # type: ignore[no-any-return]

    @property
    def file(self) -> Path:
        return self.entry.versions[self.version_number]

    def load(self, context: LoadContext) -> None:
        pb = messages()
        config = self.entry.config
        device, self.instances = self._placement(context.device, pb)
        if self.entry.platform == ONNX:
            self.runner: Runner = OnnxRunner(self.file, context.threads, device)
        else:
            self.runner = TorchScriptRunner(
                self.file,
                device,
                [t.name for t in config.input],
                [t.name for t in config.output],
            )
        try:
            self.resolved = resolve(
                config, self.runner.signature(), self.file, self.entry.config_where, pb
            )
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        completed = self.resolved.config
        if not completed.platform and not completed.backend:
            completed.platform = self.entry.platform  # as Triton's auto-complete fills it in
        self.overrides = self._overrides()
        self.output_names = [spec.name for spec in self.resolved.outputs]
        if (image := self.resolved.image) is not None:
            decode.size_budget(self.settings.max_decode_pixels)
            preprocess = image.preprocess
            shape = (1, 3, 1, 1) if image.layout == "NCHW" else (1, 1, 1, 3)
            self._mean = np.array(preprocess.mean, np.float32).reshape(shape)
            self._scale = 1 / np.array(preprocess.std, np.float32).reshape(shape)

    def _placement(self, device: str, pb: Any) -> tuple[str, int | None]:
        """Where the model computes and how many batches may compute at once, from its
        ``instance_group`` (Triton's model instances): KIND_CPU on the CPU, KIND_GPU on
        the GPU (the one ``gpus`` names), and ``count`` instances in all. Without one,
        DEVICE and as many batches as the backend runs side by side."""
        groups = self.entry.config.instance_group
        if not groups:
            return device, None
        where = f"{self.entry.config_where}: instance_group"
        kinds = {group.kind for group in groups}
        gpus = sorted({gpu for group in groups for gpu in group.gpus})
        if len(kinds) > 1:
            raise ModelLoadError(f"{where} mixes kinds; give the model one kind of instance")
        (kind,) = kinds
        if kind == pb.ModelInstanceGroup.KIND_CPU:
            device = "cpu"
        elif kind == pb.ModelInstanceGroup.KIND_GPU:
            if not device.startswith("cuda"):
                raise ModelLoadError(
                    f"{where} asks for KIND_GPU but this server computes on {device}: set"
                    " DEVICE=cuda on a GPU host, or kind: KIND_CPU"
                )
            if len(gpus) > 1:
                raise ModelLoadError(f"{where} lists GPUs {gpus}; a model runs on one here")
            device = f"cuda:{gpus[0]}" if gpus else device
        return device, sum(max(1, group.count) for group in groups)

    def _overrides(self) -> ServingOverrides:
        config = self.resolved.config
        if not config.HasField("dynamic_batching"):
            return ServingOverrides(max_batch_size=config.max_batch_size or None)
        batching = config.dynamic_batching
        policy = batching.default_queue_policy
        if policy.timeout_action != policy.REJECT:
            raise ModelLoadError(
                f"{self.entry.config_where}: default_queue_policy.timeout_action DELAY is not"
                " supported; a request that waits too long is answered 504 (REJECT)"
            )
        return ServingOverrides(
            max_batch_size=config.max_batch_size or None,
            max_batch_delay_ms=batching.max_queue_delay_microseconds / 1000,
            timeout=policy.default_timeout_microseconds / 1e6 or None,
            max_queue_size=policy.max_queue_size or None,
        )

    def serving_overrides(self) -> ServingOverrides:
        return self.overrides

    # -- inputs

    def check_item(self, value: Any) -> None:
        if self.resolved.image is not None:
            image_text(value)
        elif not isinstance(value, dict):
            raise InputError(self._how_to_send(), 422)

    def decode(self, payload: Payload, options: RepositoryOptions) -> Item:
        image = self.resolved.image
        if image is not None:
            preprocess = image.preprocess
            picture = read_image(payload, self.settings, min_side=2 * preprocess.resize_size)
            return preprocess.crop(picture)
        if isinstance(payload, bytes):
            raise InputError(f"model {self.name!r} takes tensors: {self._how_to_send()}", 415)
        if not isinstance(payload, Mapping):
            raise InputError(self._how_to_send(), 422)
        return self._row(payload)

    def _how_to_send(self) -> str:
        fields = ", ".join(
            f'"{s.name}": {s.datatype} {list(s.shape[1:])}' for s in self.resolved.inputs
        )
        return f"send a JSON object of one row's inputs by name, {{{fields}}}, or use /v2"

    def _row(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One row's inputs, as arrays of the declared types and shapes."""
        row = {}
        for spec in self.resolved.inputs:
            if spec.name not in values:
                raise InputError(f"input {spec.name!r} is missing; {self._how_to_send()}")
            try:
                array = np.asarray(values[spec.name], dtype=DATATYPES[spec.datatype])
            except (TypeError, ValueError, OverflowError):
                raise InputError(
                    f"input {spec.name!r} does not hold {spec.datatype} values"
                ) from None
            dims = spec.shape[1:]
            if array.ndim != len(dims) or any(
                d not in (-1, n) for d, n in zip(dims, array.shape, strict=True)
            ):
                raise InputError(
                    f"input {spec.name!r} has shape {list(array.shape)} in one row;"
                    f" the model takes {list(dims)} (-1: any size)"
                )
            row[spec.name] = array
        unknown = set(values) - {spec.name for spec in self.resolved.inputs}
        if unknown:
            raise InputError(f"unknown input {sorted(unknown)[0]!r}; {self._how_to_send()}")
        return row

    # -- the model

    def predict_batch(self, items: list[Item]) -> list[Result | Exception]:
        if self.resolved.image is not None:
            outputs = self.runner.run(self._image_batch(items), self.output_names)  # type: ignore[arg-type]
            return self._rows(outputs, len(items))
        results: list[Result | Exception] = [{}] * len(items)
        for indices in _same_shapes(items).values():  # type: ignore[arg-type]
            feeds = {
                spec.name: np.stack([items[i][spec.name] for i in indices])
                for spec in self.resolved.inputs
            }
            rows = self._rows(self.runner.run(feeds, self.output_names), len(indices))
            for i, row in zip(indices, rows, strict=True):
                results[i] = row
        return results

    def _image_batch(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The model's input for a batch of uint8 RGB crops: channels in the model's
        order, normalised in place (one pass each, as classification's ONNX backend)."""
        image = self.resolved.image
        assert image is not None
        pixels = np.stack(items)  # N, H, W, 3
        if image.bgr:
            pixels = pixels[..., ::-1]
        if image.layout == "NCHW":
            pixels = pixels.transpose(0, 3, 1, 2)
        batch = np.empty(pixels.shape, dtype=np.float32)
        np.copyto(batch, pixels)
        batch -= self._mean
        batch *= self._scale
        if image.datatype != "FP32":
            batch = batch.astype(DATATYPES[image.datatype])
        return {image.name: batch}

    def _rows(self, outputs: list[np.ndarray], count: int) -> list[Result | Exception]:
        for name, output in zip(self.output_names, outputs, strict=True):
            if output.shape[:1] != (count,):
                raise ValueError(
                    f"output {name!r} has shape {list(output.shape)} for a batch of {count}"
                )
        return [
            {name: output[i] for name, output in zip(self.output_names, outputs, strict=True)}
            for i in range(count)
        ]

    # -- answers

    def encode(self, result: Result, options: RepositoryOptions) -> Any:
        if self.resolved.classified is None:
            return {name: value.tolist() for name, value in result.items()}
        scores = self._top(
            result, options.top_k or self.resolved.top_k, softmax=self.resolved.softmax
        )
        ranked = [ClassPrediction(class_id=i, label=label, score=s) for s, i, label in scores]
        return Classification(prediction=ranked[0], top_k=ranked)

    def _top(self, result: Result, count: int, *, softmax: bool) -> list[tuple[float, int, str]]:
        name = self.resolved.classified or self.output_names[0]
        values = result[name].reshape(-1).astype(np.float64)
        if softmax:
            values = np.exp(values - values.max())
            values /= values.sum()
        labels = self.resolved.labels.get(name, ())
        best = np.argsort(-values, kind="stable")[:count]
        return [(float(values[i]), int(i), labels[i] if i < len(labels) else str(i)) for i in best]

    def tensor_form(self) -> TensorForm:
        inputs = self.resolved.inputs
        if (image := self.resolved.image) is not None:
            inputs = (TensorSpec(image.name, "BYTES", (-1, 1)),)
        return TensorForm(inputs=inputs, outputs=self.resolved.outputs)

    def tensor_payload(self, row: Row) -> Payload:
        if (image := self.resolved.image) is not None:
            return only_bytes(row, image.name)
        return dict(row)

    def tensor_outputs(self, results: list[Result], options: Any) -> dict[str, np.ndarray]:
        try:
            return {name: np.stack([r[name] for r in results]) for name in self.output_names}
        except ValueError:
            raise InputError(
                "the rows' outputs differ in shape; send rows of one shape per request"
            ) from None

    def classification(self, result: Result, count: int) -> list[str]:
        # As Triton's classification extension: the output's own values, best first.
        return [f"{s:f}:{i}:{label}" for s, i, label in self._top(result, count, softmax=False)]

    # -- the rest of the contract

    def concurrency(self) -> int:
        if self.instances is None:
            return self.runner.concurrency
        return max(1, min(self.instances, self.runner.concurrency))

    def warm_up(self, max_batch_size: int, tune: bool) -> dict[str, Any]:
        """Every batch shape, timed as the batcher runs them (``concurrency`` calls side
        by side) when ``tune``; for an image model, the decode time of the sample photo."""
        example = self.example()

        def run(size: int) -> None:
            self.predict_batch([example] * size)

        for size in batch_shapes(max_batch_size):
            run(size)  # the shapes of a call alone, on its own session
        with self.runner.side_by_side():
            report = tune_batch_size(run, max_batch_size, tune=tune, concurrency=self.concurrency())
        if self.resolved.image is not None:
            data = SAMPLE_IMAGE.read_bytes()
            report["decode_seconds_per_item"] = fastest(lambda: self.decode(data, self.Options()))
        return report

    def example(self) -> Item:
        if (image := self.resolved.image) is not None:
            side = image.preprocess.crop_size
            return np.zeros((side, side, 3), np.uint8)
        return {
            spec.name: np.zeros(
                [1 if d == -1 else d for d in spec.shape[1:]], DATATYPES[spec.datatype]
            )
            for spec in self.resolved.inputs
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "platform": self.entry.platform,
            "file": str(self.file),
            "image": self.resolved.image is not None,
            "labels": {name: len(labels) for name, labels in self.resolved.labels.items()},
        }

    def model_config(self) -> dict[str, Any]:
        config: dict[str, Any] = json_format.MessageToDict(
            self.resolved.config, preserving_proto_field_name=True
        )
        completed: dict[str, Any] = _numbers_as_numbers(config)
        return completed


def _same_shapes(items: list[dict[str, np.ndarray]]) -> dict[tuple[Any, ...], list[int]]:
    """The items' indices grouped by their inputs' shapes: each group is one call."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(v.shape for v in item.values()), []).append(i)
    return groups


# The config's 64-bit fields, which protobuf's JSON writes as strings.
_INT64_FIELDS = frozenset(
    {"dims", "max_queue_delay_microseconds", "default_timeout_microseconds", "versions"}
)


def _numbers_as_numbers(value: Any, key: str = "") -> Any:
    """``value`` with the 64-bit fields as JSON numbers, as Triton writes them."""
    if isinstance(value, dict):
        return {k: _numbers_as_numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_as_numbers(v, key) for v in value]
    if key in _INT64_FIELDS and isinstance(value, str):
        return int(value)
    return value
