"""Peer servers for the HTTP benchmark: TorchServe, LitServe, Ray Serve and a plain FastAPI app, each doing the
same work per request as our service (bench/peers/work.py), installed apart in .bench-venv/ by setup.sh.

``peer_servers(export_dir)`` gives them as ``bench.http.Server``s with a ``predict_path``, ready for
``bench.http.interleaved``; ``check_peer(...)`` compares a server's answers with in-process ONNX Runtime;
``python -m bench.peers --check | --compare`` runs both against our service.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"peer_servers": "servers", "PeerServer": "servers", "check_peer": "check", "PeerMismatch": "check"}


def __getattr__(name: str):
    # imported on first use: the peers' own processes import bench.peers.* from .bench-venv, which has
    # neither httpx nor the rest of the harness that servers.py and check.py need
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"bench.peers.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
