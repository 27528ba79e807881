"""The peer servers as ``bench.http.Server``s: each runs from .bench-venv on a free port, in its own temporary
folder, and is stopped with everything it started, Ray's actors and TorchServe's JVM included."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.http import REPO, Server

log = logging.getLogger(__name__)
VENV = REPO / ".bench-venv"
PYTHON = str(VENV / "bin" / "python")


@dataclass
class PeerServer(Server):
    """A Server with the path to send predictions to, and a stop that leaves no process behind.

    ``{port}`` and ``{workdir}`` in argv are filled in at start. On exit the launcher (or, with
    ``signal_group``, its whole process group) gets SIGTERM and ``stop_s`` to shut its framework down; any
    process of the tree seen at that moment that is still alive then gets SIGKILL. The tree, not the group:
    Ray puts each actor in a process group of its own."""

    predict_path: str = "/predict"
    multi_image: bool = True  # answers every file of a request with several files in ``images``
    signal_group: bool = True
    stop_s: float = 60

    def __enter__(self) -> PeerServer:
        if not Path(PYTHON).exists():
            raise RuntimeError(f"{PYTHON} is missing: run `make bench-peers` (bench/peers/setup.sh) first")
        self.workdir = tempfile.mkdtemp(prefix=f"peer-{self.name}-")
        self.template = self.argv
        self.argv = [a.replace("{workdir}", self.workdir) for a in self.argv]
        try:
            super().__enter__()
        except BaseException:
            if self.proc is not None:
                self.__exit__()
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc) -> None:
        tree = _tree(self.proc.pid)
        for p in tree:  # a frozen process (bench.http.only) would hold its SIGTERM until the SIGKILL below
            with contextlib.suppress(psutil.Error):
                p.resume()
        try:
            if self.signal_group:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.terminate()
            self.proc.wait(timeout=self.stop_s)
        except ProcessLookupError:
            pass  # the launcher is gone already; its leftovers are killed below
        except subprocess.TimeoutExpired:
            log.warning("%s: launcher still running after %.0f s", self.name, self.stop_s)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for p in alive:
            log.warning("%s: killing leftover process %d (%s)", self.name, p.pid, _name(p))
            p.kill()
        psutil.wait_procs(alive, timeout=10)
        self.proc.wait()
        self.argv = self.template
        shutil.rmtree(self.workdir, ignore_errors=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


def peer_servers(export_dir: Path) -> dict[str, PeerServer]:
    """The four peers, not started yet; each serves ``export_dir`` (an export folder with manifest.json)."""
    export = str(Path(export_dir).resolve())
    env = {"PYTHONPATH": str(REPO), "MNIST_EXPORT_DIR": export}
    module = [PYTHON, "-m"]
    with_port = ["--port", "{port}", "--export", export]
    return {
        "torchserve": PeerServer(
            "torchserve",
            [*module, "bench.peers.torchserve", *with_port, "--workdir", "{workdir}"],
            "/ping",
            env,
            predict_path="/predictions/mnist",
            multi_image=False,  # bench/peers/torchserve_handler.py says why
        ),
        "litserve": PeerServer("litserve", [*module, "bench.peers.litserve_app", *with_port], "/health", env),
        "rayserve": PeerServer(
            "rayserve",
            [*module, "bench.peers.rayserve_app", *with_port, "--workdir", "{workdir}"],
            "/health",
            env,
            signal_group=False,  # the launcher shuts Serve and Ray down itself; a group SIGTERM races it
            stop_s=90,
        ),
        "fastapi": PeerServer(
            "fastapi",
            [*module, "uvicorn", "bench.peers.fastapi_app:app", "--host", "127.0.0.1", "--port", "{port}"]
            + ["--workers", "2", "--loop", "uvloop", "--http", "httptools"],
            "/health",
            env,
        ),
    }
