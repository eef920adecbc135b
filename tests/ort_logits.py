"""The logits of ONNX models on saved inputs, with nothing but ONNX Runtime and NumPy, so
that it starts quickly under an emulated CPU (tests/test_int8.py).

    python tests/ort_logits.py INPUTS.npy OUT.npz MODEL.onnx ...

OUT.npz holds each model's logits in the order given: arr_0, arr_1, ..."""

import sys

import numpy as np
import onnxruntime


def main(inputs_path: str, out_path: str, *models: str) -> None:
    inputs = np.load(inputs_path)
    logits = []
    for path in models:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        [outputs] = session.run(None, {session.get_inputs()[0].name: inputs})
        logits.append(outputs)
    np.savez(out_path, *logits)


if __name__ == "__main__":
    main(*sys.argv[1:])
