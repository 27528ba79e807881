"""``python -m bench.peers.litserve_app --port P --export DIR`` (from .bench-venv): LitServe serving the work of
bench/peers/work.py at POST /predict.

Settings, from LitServe's docs: batching in the LitAPI (``max_batch_size=32``, ``batch_timeout=0.001`` s,
the same as TorchServe's here), two inference workers on the CPU (``workers_per_device=2``), the ZeroMQ
queue its docs recommend above about 100 requests/s (``fast_queue``), and as many API server processes as
inference workers (its default). The API servers parse the multipart body; the inference workers decode
the images, batch, run the model and encode the answers.
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np

from bench.peers.work import Pipeline


class MNISTLitAPI(ls.LitAPI):
    def __init__(self, export_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.export_dir = export_dir

    def setup(self, device: str) -> None:
        self.pipeline = Pipeline(self.export_dir)

    def decode_request(self, request) -> np.ndarray:
        # an unannotated request is the form LitServe parsed (starlette FormData), files held in memory
        return self.pipeline.preprocess([upload.file.read() for upload in request.getlist("images")])

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs  # requests carry different numbers of images: predict_requests keeps them apart

    def predict(self, inputs: list[np.ndarray]) -> list[list[dict]]:
        return self.pipeline.predict_requests(inputs)

    def unbatch(self, outputs: list[list[dict]]) -> list[list[dict]]:
        return outputs

    def encode_response(self, answers: list[dict]) -> list[dict]:
        return answers


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers.litserve_app", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--export", required=True, help="an export folder (convnet.onnx, manifest.json)")
    args = p.parse_args(argv)
    api = MNISTLitAPI(args.export, max_batch_size=32, batch_timeout=0.001)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=2, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
