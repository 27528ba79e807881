"""The Open Inference Protocol (KServe v2) on the service's own port: the adapter for Triton's and KServe's
clients, NVIDIA's perf_analyzer and KServe's v2 predictors.

Two models, both described from the export's manifest:

- ``mnist-convnet``: the exported network as Triton would serve ``convnet.onnx``: normalized FP32 images in,
  log-probabilities out. The work process runs it on the tensor as sent.
- ``mnist``: the classifier end to end: encoded image files (BYTES) or MNIST-format pixels (UINT8, 28x28) in,
  the digit and the ten probabilities out: the same preprocessing as ``/predict``.

Both go through the one batcher: a request of N images is N images in the batch bound.
"""

from __future__ import annotations

from importlib import metadata as package_metadata

import numpy as np

from service import v2_tensors
from service.connections import DRAIN
from service.errors import RequestError, bad_request
from service.frontend import Request, Response, Route, started
from service.runtime import softmax_from_log

CONVNET, PIPELINE = "mnist-convnet", "mnist"
EXTENSIONS = ["binary_tensor_data"]
V2_DTYPE = {"float32": "FP32", "uint8": "UINT8", "int64": "INT64"}


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]  # the manifest names the batch axis "batch"


def model_metadata(manifest: dict, runtime: str) -> dict[str, dict]:
    """Both models' metadata, from the manifest: names, datatypes and shapes as the export recorded them."""
    x, y = manifest["input"], manifest["output"]
    side = manifest["model_config"]["image_size"]
    classes = y["shape"][-1]
    return {
        CONVNET: {
            "platform": "onnxruntime_onnx" if runtime == "onnx" else "pytorch_libtorch",
            "inputs": [{"name": x["name"], "datatype": V2_DTYPE[x["dtype"]], "shape": _dims(x["shape"])}],
            "outputs": [{"name": y["name"], "datatype": V2_DTYPE[y["dtype"]], "shape": _dims(y["shape"])}],
        },
        PIPELINE: {
            "platform": "mnist_pipeline",
            # BYTES: encoded image files; UINT8 [-1, 28, 28] (MNIST-format pixels) is accepted as well
            "inputs": [{"name": x["name"], "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "digit", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            ],
            "uint8_shape": [-1, side, side],
        },
    }


async def v2(service, request: Request) -> Response:
    """Every /v2 path: parsed here, so that one route and one metric label serve the whole protocol."""
    parts = [p for p in request.scope["path"].split("/") if p][1:]
    method = request.scope["method"]
    if parts in ([], ["health", "live"], ["health", "ready"]):
        _only(method, "GET")
        return _server(service, parts)
    if not parts or parts[0] != "models" or len(parts) < 2:
        raise RequestError(404, "not_found", f"no such path: {request.scope['path'][:200]}")
    request.require_token()
    service = started(service)
    name, rest = parts[1], parts[2:]
    version = service.model.tag.version
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or rest[1] != version:
            raise RequestError(404, "not_found", f"model {name!r} has no version {rest[1:2]}; it has {version!r}")
        rest = rest[2:]
    models = service.v2_models
    if name not in models:
        raise RequestError(404, "not_found", f"no model {name!r}; the models are {', '.join(models)}")
    if rest == []:
        _only(method, "GET")
        meta = {k: v for k, v in models[name].items() if k != "uint8_shape"}
        return Response.json({"name": name, "versions": [version], **meta})
    if rest == ["ready"]:
        _only(method, "GET")
        return Response.json({"name": name, "ready": service.batcher.ready})
    if rest == ["infer"]:
        _only(method, "POST")
        return await _infer(service, request, name, version)
    raise RequestError(404, "not_found", f"no such path: {request.scope['path'][:200]}")


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise RequestError(405, "unsupported", f"this path accepts {allowed}", allow=allowed)


def _server(service, parts: list[str]) -> Response:
    if not parts:
        try:
            version = package_metadata.version("mnist-serving")
        except package_metadata.PackageNotFoundError:  # running from a bento's source folder
            version = "unknown"
        return Response.json({"name": "mnist-serving", "version": version, "extensions": EXTENSIONS})
    if parts[1] == "live":
        return Response.json({"live": True})
    if DRAIN.draining or service is None or not service.batcher.ready:
        raise RequestError(503, "unavailable", "not ready" + (": draining" if DRAIN.draining else ""))
    return Response.json({"ready": True})


async def _infer(service, request: Request, name: str, version: str) -> Response:
    kind = request.header(b"content-type").split(";")[0].strip().lower()
    if kind not in ("", "application/json", "application/octet-stream"):
        raise RequestError(
            415, "unsupported", f"inference requests are JSON, optionally followed by binary data; got {kind}"
        )
    header_length = request.headers.get(b"inference-header-content-length")
    parsed = v2_tensors.parse(await request.body(), header_length)
    meta = service.v2_models[name]
    expected = meta["inputs"][0]["name"]
    if [t.name for t in parsed.inputs] != [expected]:
        raise bad_request(f"model {name!r} takes one input, {expected!r}; got {[t.name for t in parsed.inputs]}")
    known = [o["name"] for o in meta["outputs"]]
    wanted = parsed.outputs if parsed.outputs is not None else known
    if unknown := [o for o in wanted if o not in known]:
        raise bad_request(f"model {name!r} has no output {unknown[0]!r}; its outputs are {known}")
    limit = service.settings.max_images_per_request
    tensor = parsed.inputs[0]
    if name == CONVNET:
        x = _checked(tensor, meta["inputs"][0], limit)
        done = await service.batcher.submit("normalized", np.ascontiguousarray(x, dtype=np.float32), len(x))
        if not np.isfinite(done.log_probs).all():  # inputs far outside the normalized range (about -0.4..2.8)
            i = int(np.argwhere(~np.isfinite(done.log_probs))[0][0])
            raise RequestError(
                400,
                "bad_shape",
                f"the network's output for images[{i}] is not finite: its input "
                "values are far outside the normalized range (MNIST's is about -0.42..2.83)",
            )
        values = {known[0]: done.log_probs}
    else:
        done = await _classify(service, tensor, meta, limit)
        probs = softmax_from_log(done.log_probs)
        values = {"digit": probs.argmax(axis=1).astype(np.int64), "probabilities": probs.astype(np.float32)}
    datatypes = {o["name"]: o["datatype"] for o in meta["outputs"]}
    header = {"model_name": name, "model_version": version}
    if parsed.id is not None:
        header["id"] = parsed.id
    body, json_length = v2_tensors.encode(header, [(o, datatypes[o], values[o]) for o in wanted], parsed.binary)
    if json_length is None:
        return Response(200, body)
    return Response(
        200, body, b"application/octet-stream", [(b"inference-header-content-length", str(json_length).encode())]
    )


async def _classify(service, tensor: v2_tensors.Tensor, meta: dict, limit: int):
    if tensor.datatype == "BYTES":
        _check_shape(tensor, [-1], limit)
        return await service.batcher.submit("encoded", tensor.value, max(1, len(tensor.value)))
    x = _checked(tensor, {"name": tensor.name, "datatype": "UINT8", "shape": meta["uint8_shape"]}, limit)
    return await service.batcher.submit("pixels", x.astype(np.float32) / 255.0, len(x))


def _checked(tensor: v2_tensors.Tensor, spec: dict, limit: int) -> np.ndarray:
    if tensor.datatype != spec["datatype"]:
        raise RequestError(400, "bad_shape", f"input {tensor.name!r} must be {spec['datatype']}, got {tensor.datatype}")
    _check_shape(tensor, spec["shape"], limit)
    return tensor.value


def _check_shape(tensor: v2_tensors.Tensor, shape: list[int], limit: int) -> None:
    ok = len(tensor.shape) == len(shape) and all(d == -1 or d == s for d, s in zip(shape, tensor.shape))
    if not ok:
        raise RequestError(400, "bad_shape", f"input {tensor.name!r} must have shape {shape}, got {tensor.shape}")
    if tensor.shape[0] == 0:
        raise bad_request(f"input {tensor.name!r} holds no images")
    if tensor.shape[0] > limit:
        raise RequestError(413, "too_large", f"{tensor.shape[0]} images in one request; the limit is {limit}")


ROUTE = Route("v2", ("GET", "POST"), v2, protected=False)  # the token is checked per path: health stays open
