"""The book's serving approach, as the baseline: Flask, eager PyTorch, one image per request.

The client preprocesses (ToTensor + Normalize) and posts the raw float32 bytes as the multipart file
``data`` plus JSON ``metadata`` with the dims; the server rebuilds the tensor and answers the argmax.
Run: ``python -m bench.book_server --checkpoint ../shared/book/convnet.pth --port 8890``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from flask import Flask, request

from training.checkpoint import build_model, load_checkpoint


def create_app(checkpoint: str) -> Flask:
    model = build_model(load_checkpoint(checkpoint))
    app = Flask(__name__)

    def run_model(input_tensor):
        model_input = input_tensor.unsqueeze(0)
        with torch.no_grad():
            model_output = model(model_input)[0]
        return model_output.detach().numpy().argmax()

    @app.route("/test", methods=["POST"])
    def test():
        data = request.files["data"].read()
        md = json.load(request.files["metadata"])
        input_array = np.frombuffer(data, dtype=np.float32)
        input_image_tensor = torch.from_numpy(input_array.copy()).view(md["dims"])
        output = run_model(input_image_tensor)
        return str(output)

    @app.route("/health")
    def health():
        return "ok"

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--port", type=int, default=8890)
    args = p.parse_args()
    create_app(args.checkpoint).run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
