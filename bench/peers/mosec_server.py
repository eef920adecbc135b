"""mosec, with the same model and preprocessing as ours: a decode stage of one process per
decode thread our server would use, then a batched stage (batches of up to 16, 5 ms) that
runs the same ONNX Runtime session.

    python bench/peers/mosec_server.py PORT

Takes the JPEG as the raw body of POST /inference. PRECISION picks the model, as for ours.
"""

import os
import sys
from typing import Any

import numpy as np
from mosec import Server, Worker

sys.path.insert(0, ".")
from classification import Classifier, ClassifyInput, load_model
from settings import Settings

settings = Settings()
PRECISION = os.environ.get("PRECISION", "float32")


class Decode(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = Classifier(load_model("efficientnet_lite0"), backend="torch")

    def deserialize(self, data: bytes) -> bytes:
        return data

    def forward(self, data: bytes) -> np.ndarray:
        return self.classifier.prepare(data, max_pixels=40_000_000)


class Classify(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = Classifier(
            load_model("efficientnet_lite0"),
            backend="onnxruntime",
            precision=PRECISION,
            threads=settings.intra_op_threads,
        )

    def forward(self, data: list[np.ndarray]) -> list[dict[str, Any]]:
        scores = self.classifier.predict([ClassifyInput(pixels, 1) for pixels in data])
        return [{"class_id": row[0].class_id, "score": row[0].score} for row in scores]


if __name__ == "__main__":
    sys.argv[1:] = ["--port", sys.argv[1], "--address", "127.0.0.1"]
    server = Server()
    server.append_worker(
        Decode, num=settings.decode_threads("cpu", light_model=PRECISION == "int8")
    )
    server.append_worker(Classify, num=1, max_batch_size=16, max_wait_time=5)
    server.run()
