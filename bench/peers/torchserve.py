"""``python -m bench.peers.torchserve --port P --export DIR --workdir TMP`` (from .bench-venv): TorchServe 0.12
serving bench/peers/torchserve_handler.py, batching on (32 requests, 1 ms), two workers, token auth off.

Builds the model archive with torch-model-archiver into ``--workdir``, writes config.properties there (free
ports for the management, metrics and gRPC APIs), then becomes ``torchserve --start --foreground``: the JVM
and its Python workers stay in this process group, so the bench stops all of them with one killpg.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

HANDLER = Path(__file__).with_name("torchserve_handler.py")
MODEL = "mnist"
# TorchServe's model-config.yaml: batchSize counts requests; maxBatchDelay is in ms
MODEL_CONFIG = "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 32\nmaxBatchDelay: 1\nresponseTimeout: 120\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def archive(export_dir: Path, store: Path, workdir: Path) -> None:
    (workdir / "model-config.yaml").write_text(MODEL_CONFIG)
    store.mkdir(exist_ok=True)
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [
            str(bin_dir / "torch-model-archiver"),
            *("--model-name", MODEL, "--version", "1.0", "--handler", str(HANDLER)),
            *("--serialized-file", str(export_dir / "convnet.onnx")),
            *("--extra-files", str(export_dir / "manifest.json")),
            *("--config-file", str(workdir / "model-config.yaml")),
            *("--export-path", str(store), "--force"),
        ],
        check=True,
    )


def config(port: int, store: Path) -> str:
    return "\n".join(
        [
            f"inference_address=http://127.0.0.1:{port}",
            f"management_address=http://127.0.0.1:{free_port()}",
            f"metrics_address=http://127.0.0.1:{free_port()}",
            f"grpc_inference_port={free_port()}",
            f"grpc_management_port={free_port()}",
            f"model_store={store}",
            "disable_token_authorization=true",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers.torchserve", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--export", type=Path, required=True, help="an export folder (convnet.onnx, manifest.json)")
    p.add_argument("--workdir", type=Path, required=True, help="archive, config, logs and pid file go here")
    args = p.parse_args(argv)
    store = args.workdir / "store"
    archive(args.export.resolve(), store, args.workdir)
    (args.workdir / "config.properties").write_text(config(args.port, store))
    os.environ.update(LOG_LOCATION=str(args.workdir / "logs"), METRICS_LOCATION=str(args.workdir / "logs"))
    os.environ["TMPDIR"] = str(args.workdir)  # torchserve keeps its pid file in the temp folder
    torchserve = str(Path(sys.executable).parent / "torchserve")
    os.execv(
        torchserve,
        [torchserve, "--start", "--foreground", "--ncs", "--disable-token-auth"]
        + ["--ts-config", str(args.workdir / "config.properties"), "--model-store", str(store)]
        + ["--models", f"{MODEL}={MODEL}.mar"],
    )


if __name__ == "__main__":
    main()
