"""LitServe, with the same model and preprocessing as ours, batches of up to 8 (5 ms).

    python bench/peers/litserve_server.py PORT

PRECISION (float32 or int8) picks the model, as for our server.
"""

import os
import sys

import litserve as ls
import numpy as np
from fastapi import Request

sys.path.insert(0, ".")
from classification import Classifier, ClassifyInput, load_model


class ImageClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.classifier = Classifier(
            load_model("efficientnet_lite0"),
            backend="onnxruntime",
            precision=os.environ.get("PRECISION", "float32"),
        )

    def decode_request(self, request: Request) -> np.ndarray:
        return self.classifier.prepare(request["file"].file.read(), max_pixels=40_000_000)

    def predict(self, batch: list[np.ndarray]) -> list[list[tuple[int, str, float]]]:
        scores = self.classifier.predict([ClassifyInput(pixels, 5) for pixels in batch])
        return [[(s.class_id, s.label, s.score) for s in row] for row in scores]

    def encode_response(self, output: list[tuple[int, str, float]]) -> dict[str, object]:
        class_id, label, score = output[0]
        return {"prediction": {"class_id": class_id, "label": label, "score": score}}


if __name__ == "__main__":
    api = ImageClassifierAPI(max_batch_size=8, batch_timeout=0.005, api_path="/cls")
    server = ls.LitServer(
        api, accelerator="cpu", workers_per_device=1, healthcheck_path="/health/ready"
    )
    server.run(port=int(sys.argv[1]), generate_client_file=False)
