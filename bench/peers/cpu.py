"""How much of the machine other processes took during a measurement: the benchmark shares its two cores with
whatever else runs there, and a number measured beside someone else's load must say so."""

from __future__ import annotations

import os
import time

import psutil

from bench import http


def _tree_cpu(server: http.Server) -> float:
    try:
        root = psutil.Process(server.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue  # exited since the listing
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _ours(live: dict[str, http.Server]) -> float:
    t = os.times()  # this process and its finished children: the wrk runs
    return t.user + t.system + t.children_user + t.children_system + sum(_tree_cpu(s) for s in live.values())


def _busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class OtherLoad:
    """``with OtherLoad(live) as load: ...``, then ``load.share``: the CPU time of processes outside the harness
    and the servers' trees, as a fraction of all cores over the block (0.5: one core of two)."""

    def __init__(self, live: dict[str, http.Server]):
        self.live = live
        self.share = 0.0

    def __enter__(self) -> OtherLoad:
        self.t0, self.busy0, self.ours0 = time.monotonic(), _busy(), _ours(self.live)
        return self

    def __exit__(self, *exc) -> None:
        others = (_busy() - self.busy0) - (_ours(self.live) - self.ours0)
        self.share = max(0.0, others) / ((time.monotonic() - self.t0) * (os.cpu_count() or 1))


def idle_shares(live: dict[str, http.Server], seconds: float = 10) -> dict[str, float]:
    """Each server's CPU use while nobody sends it anything, as a fraction of all cores: what it takes from
    the others' windows, since every server runs all along (Ray's cluster, TorchServe's JVM)."""
    before = {name: _tree_cpu(s) for name, s in live.items()}
    time.sleep(seconds)
    cores = os.cpu_count() or 1
    return {name: (_tree_cpu(s) - before[name]) / (seconds * cores) for name, s in live.items()}


def wait_quiet(live: dict[str, http.Server], below: float = 0.1, limit_s: float = 600) -> float:
    """Wait, up to ``limit_s``, until other processes take less than ``below`` of the machine over 5 s; returns
    the last share seen (still above ``below`` when the limit ran out)."""
    deadline = time.monotonic() + limit_s
    while True:
        with OtherLoad(live) as load:
            time.sleep(5)
        if load.share < below or time.monotonic() > deadline:
            return load.share
