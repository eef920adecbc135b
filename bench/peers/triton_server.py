"""NVIDIA Triton Inference Server, through PyTriton, with the same model and preprocessing
as ours: its dynamic batcher (batches of up to 16, 5 ms) in front of one Python model
that decodes the batch's JPEGs in a thread pool and runs the same ONNX Runtime session.

    .venv-triton/bin/python bench/peers/triton_server.py PORT

Speaks the Open Inference Protocol on PORT (HTTP) and on GRPC_PORT (gRPC; PORT+1 if unset).
PRECISION (float32 or int8) picks the model, as for our server.
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, ".")
from classification import Classifier, ClassifyInput, load_model
from settings import Settings

settings = Settings()
classifier = Classifier(
    load_model("efficientnet_lite0"),
    backend="onnxruntime",
    precision=os.environ.get("PRECISION", "float32"),
    threads=settings.intra_op_threads,
)
decoders = ThreadPoolExecutor(
    settings.decode_threads("cpu", light_model=classifier.precision == "int8")
)


@batch
def classify(image: np.ndarray) -> dict[str, np.ndarray]:
    pixels = decoders.map(
        lambda blob: classifier.prepare(bytes(blob[0]), max_pixels=40_000_000), image
    )
    scores = classifier.predict([ClassifyInput(p, 1) for p in pixels])
    return {
        "class_id": np.array([[row[0].class_id] for row in scores], dtype=np.int64),
        "score": np.array([[row[0].score] for row in scores], dtype=np.float32),
    }


if __name__ == "__main__":
    port = int(sys.argv[1])
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=port,
        grpc_address="127.0.0.1",
        grpc_port=int(os.environ.get("GRPC_PORT") or port + 1),
        metrics_port=port + 2,
        allow_metrics=False,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="cls",
            infer_func=classify,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="class_id", dtype=np.int64, shape=(1,)),
                Tensor(name="score", dtype=np.float32, shape=(1,)),
            ],
            config=ModelConfig(
                max_batch_size=16, batcher=DynamicBatcher(max_queue_delay_microseconds=5000)
            ),
            strict=True,
        )
        triton.serve()
