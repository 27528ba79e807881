"""The Open Inference Protocol (KServe v2) on the service's own port: the adapter for Triton's and KServe's
clients, NVIDIA's perf_analyzer and KServe's v2 predictors. Two models, as the core describes them
(service/core.py ``model_specs``):

- ``mnist-convnet``: the exported network as Triton would serve ``convnet.onnx``: normalized FP32 images in,
  log-probabilities out.
- ``mnist``: the classifier end to end: encoded image files (BYTES) or MNIST-format pixels (UINT8, 28x28) in,
  the digit, the ten probabilities, whether it looks like a digit and its score out: the same preprocessing as
  ``/predict``.
"""

from __future__ import annotations

from importlib import metadata as package_metadata

import numpy as np

from service.core import CONVNET, Core, InputKind, ModelSpec, TensorSpec, not_ready
from service.errors import RequestError, bad_request
from service.http.front import Request, Response, Route
from service.protocols import v2_codec

EXTENSIONS = ["binary_tensor_data"]
V2_DTYPE = {"float32": "FP32", "uint8": "UINT8", "int64": "INT64", "bytes": "BYTES", "bool": "BOOL"}


def _tensor_metadata(t: TensorSpec) -> dict:
    return {"name": t.name, "datatype": V2_DTYPE[t.dtype], "shape": list(t.shape)}


def metadata(spec: ModelSpec, version: str) -> dict:
    return {
        "name": spec.name,
        "versions": [version],
        "platform": spec.platform,
        "inputs": [_tensor_metadata(t) for t in spec.inputs],
        "outputs": [_tensor_metadata(t) for t in spec.outputs],
    }


async def v2(request: Request) -> Response:
    """Every /v2 path: parsed here, so that one route and one metric label serve the whole protocol."""
    parts = [p for p in request.scope["path"].split("/") if p][1:]
    method = request.scope["method"]
    if parts in ([], ["health", "live"], ["health", "ready"]):
        _only(method, "GET")
        return _server(request, parts)
    if not parts or parts[0] != "models" or len(parts) < 2:
        raise RequestError(404, "not_found", f"no such path: {request.scope['path'][:200]}")
    request.require_token()
    core = request.core
    name, rest = parts[1], parts[2:]
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or rest[1] != core.version:
            shown = [v[:80] for v in rest[1:2]]
            message = f"model {name[:80]!r} has no version {shown}; it has {core.version!r}"
            raise RequestError(404, "not_found", message)
        rest = rest[2:]
    if name not in core.models:
        raise RequestError(404, "not_found", f"no model {name[:80]!r}; the models are {', '.join(core.models)}")
    if rest == []:
        _only(method, "GET")
        return Response.json(metadata(core.models[name], core.version))
    if rest == ["ready"]:
        _only(method, "GET")
        if reason := not_ready(core):
            raise RequestError(503, "unavailable", f"model {name!r} is not ready: {reason}")
        return Response.json({"name": name, "ready": True})
    if rest == ["infer"]:
        _only(method, "POST")
        return await _infer(core, request, core.models[name])
    raise RequestError(404, "not_found", f"no such path: {request.scope['path'][:200]}")


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise RequestError(405, "unsupported", f"this path accepts {allowed}", allow=allowed)


def _server(request: Request, parts: list[str]) -> Response:
    if not parts:
        try:
            version = package_metadata.version("mnist-serving")
        except package_metadata.PackageNotFoundError:  # running from a bento's source folder
            version = "unknown"
        return Response.json({"name": "mnist-serving", "version": version, "extensions": EXTENSIONS})
    if parts[1] == "live":
        return Response.json({"live": True})
    if reason := not_ready(request.front.core):
        raise RequestError(503, "unavailable", f"not ready: {reason}")
    return Response.json({"ready": True})


async def _infer(core: Core, request: Request, spec: ModelSpec) -> Response:
    kind = request.header(b"content-type").split(";")[0].strip().lower()
    if kind not in ("", "application/json", "application/octet-stream"):
        raise RequestError(
            415, "unsupported", f"inference requests are JSON, optionally followed by binary data; got {kind}"
        )
    header_length = request.headers.get(b"inference-header-content-length")
    parsed = v2_codec.parse(await request.work_body(), header_length)
    name, expected = spec.name, spec.inputs[0].name
    if [t.name for t in parsed.inputs] != [expected]:
        got = [t.name[:80] for t in parsed.inputs[:4]]
        raise bad_request(f"model {name!r} takes one input, {expected!r}; got {got}")
    known = [o.name for o in spec.outputs]
    wanted = parsed.outputs if parsed.outputs is not None else known
    if unknown := [o for o in wanted if o not in known]:
        raise bad_request(f"model {name!r} has no output {unknown[0][:80]!r}; its outputs are {known}")
    limit = core.config.max_images_per_request
    tensor = parsed.inputs[0]
    if name == CONVNET:
        x = _checked(tensor, spec.inputs[0], limit)
        log_probs = await core.network(np.ascontiguousarray(x, dtype=np.float32), request.call)
        if not np.isfinite(log_probs).all():  # inputs far outside the normalized range (about -0.4..2.8)
            i = int(np.argwhere(~np.isfinite(log_probs))[0][0])
            raise RequestError(
                400,
                "bad_shape",
                f"the network's output for images[{i}] is not finite: its input "
                "values are far outside the normalized range (MNIST's is about -0.42..2.83)",
            )
        values = {known[0]: log_probs}
    else:
        answer = await _classify(core, request, tensor, spec, limit)
        probs = answer.probabilities()
        values = {
            "digit": probs.argmax(axis=1).astype(np.int64),
            "probabilities": probs.astype(np.float32),
            "looks_like_digit": np.asarray(answer.looks_like_digit(), dtype=bool),
            "digit_score": answer.digit_scores.astype(np.float32),
        }
    datatypes = {o.name: V2_DTYPE[o.dtype] for o in spec.outputs}
    header = {"model_name": name, "model_version": core.version}
    if parsed.id is not None:
        header["id"] = parsed.id
    body, json_length = v2_codec.encode(header, [(o, datatypes[o], values[o]) for o in wanted], parsed.binary)
    if json_length is None:
        return Response(200, body)
    return Response(
        200, body, b"application/octet-stream", [(b"inference-header-content-length", str(json_length).encode())]
    )


async def _classify(core: Core, request: Request, tensor: v2_codec.Tensor, spec: ModelSpec, limit: int):
    if tensor.datatype == "BYTES":
        _check_shape(tensor, spec.inputs[0].shape, limit)
        return await core.classify(InputKind.ENCODED, tensor.value, len(tensor.value), call=request.call)
    x = _checked(tensor, spec.also_accepts[0], limit)
    return await core.classify(InputKind.PIXELS, x.astype(np.float32) / 255.0, len(x), call=request.call)


def _checked(tensor: v2_codec.Tensor, spec: TensorSpec, limit: int) -> np.ndarray:
    datatype = V2_DTYPE[spec.dtype]
    if tensor.datatype != datatype:
        raise RequestError(
            400, "bad_shape", f"input {tensor.name[:80]!r} must be {datatype}, got {tensor.datatype[:20]}"
        )
    _check_shape(tensor, spec.shape, limit)
    return tensor.value


def _check_shape(tensor: v2_codec.Tensor, shape: tuple[int, ...], limit: int) -> None:
    ok = len(tensor.shape) == len(shape) and all(d == -1 or d == s for d, s in zip(shape, tensor.shape))
    if not ok:
        raise RequestError(
            400, "bad_shape", f"input {tensor.name[:80]!r} must have shape {list(shape)}, got {tensor.shape}"
        )
    if tensor.shape[0] == 0:
        raise bad_request(f"input {tensor.name[:80]!r} holds no images")
    if tensor.shape[0] > limit:
        raise RequestError(413, "too_large", f"{tensor.shape[0]} images in one request; the limit is {limit}")


# Every method reaches the adapter, which answers a 405 with the Allow of the path asked for; the token is
# checked per path: health stays open.
ROUTE = Route("v2", ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"), v2, protected=False)
