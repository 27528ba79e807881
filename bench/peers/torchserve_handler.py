"""TorchServe handler: the work of bench/peers/work.py, on the batches TorchServe's frontend assembles.

TorchServe hands ``handle`` one dict per request of the batch, ``{form field name: bytes}``, built by
``ts.service.Service.retrieve_data_for_inference`` with ``dict.update``: a repeated field keeps only its last
value. A multipart body with 64 files in ``images`` therefore reaches the handler as one image (the last)
and gets one answer; one request per image is TorchServe's own shape for this (its batching merges them).
"""

from __future__ import annotations

import json

from bench.peers.work import Pipeline


class MNISTHandler:
    def initialize(self, context) -> None:
        # the archive carries convnet.onnx and manifest.json; TorchServe unpacks them into model_dir
        self.pipeline = Pipeline(context.system_properties["model_dir"])
        self.initialized = True

    def handle(self, data: list[dict], context) -> list[str]:
        inputs = [self.pipeline.preprocess([row["images"]]) for row in data]
        answers = self.pipeline.predict_requests(inputs)
        for i in range(len(data)):
            context.set_response_content_type(i, "application/json")
        # a string goes out as it is; anything else TorchServe serializes with json.dumps(indent=2)
        return [json.dumps(a) for a in answers]
