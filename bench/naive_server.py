"""The baseline users write by hand: FastAPI, decode and infer inside each request.

python bench/naive_server.py PORT
"""

import io
import sys
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, ".")
from classification.models import load_model

model = load_model("efficientnet_lite0")
transform = v2.Compose(
    [
        v2.Resize(256, antialias=True),
        v2.CenterCrop(224),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32),
        v2.Normalize(model.preprocess.mean, model.preprocess.std),
    ]
)
app = FastAPI()


@app.post("/cls")
def classify(file: Annotated[UploadFile, File()]) -> dict[str, object]:
    image = Image.open(io.BytesIO(file.file.read())).convert("RGB")
    with torch.inference_mode():
        probabilities = model.module(transform(image)[None]).softmax(dim=1)[0]
    score, class_id = probabilities.max(dim=0)
    label = model.labels[int(class_id)]
    return {"prediction": {"class_id": int(class_id), "label": label, "score": float(score)}}


@app.get("/health/ready")
def ready() -> dict[str, str]:
    return {"status": "ready"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
