"""How much of the machine other processes took during a measurement: the benchmark shares its two cores with
whatever else runs there, and a number measured beside someone else's load must say so."""

from __future__ import annotations

import contextlib
import functools
import os
import time
import urllib.request
from collections.abc import Iterator

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import http


def _cpu_s(p: psutil.Process) -> float:
    """The CPU seconds of ``p`` and of its children it has reaped; 0 if it exited since the listing."""
    try:
        t = p.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system + t.children_user + t.children_system


def _tree_cpu(server: http.Server) -> float:
    try:
        root = psutil.Process(server.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    return sum(map(_cpu_s, procs))


def _by_worker(server: http.Server) -> dict[str, float]:
    """CPU seconds so far of the server's launcher (key "") and of each of its children with everything under it.
    For ``bentoml serve`` the children are the HTTP workers (key: "worker" and the ``--worker-id`` BentoML gave
    it), and under them their work processes."""
    try:
        root = psutil.Process(server.proc.pid)
        children = root.children()
    except psutil.NoSuchProcess:
        return {}
    out = {"": _cpu_s(root)}
    for child in children:
        try:
            below = child.children(recursive=True)
            out[_label(child)] = _cpu_s(child) + sum(map(_cpu_s, below))
        except psutil.Error:
            continue  # exited since the listing
    return out


def _label(p: psutil.Process) -> str:
    argv = p.cmdline()
    if "--worker-id" in argv[:-1]:
        return f"worker {argv[argv.index('--worker-id') + 1]}"
    return f"pid {p.pid}"


def cores_split(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """Two ``_by_worker`` readings ``seconds`` apart -> cores used: ``total`` (the launcher and every worker),
    ``workers`` (label -> cores; a worker that started in between counts from zero, one that ended is left out),
    and ``cpu_s``, the CPU seconds all of them used (what a window's requests cost the server)."""
    spent = {key: max(0.0, cpu - before.get(key, 0.0)) for key, cpu in after.items()}
    used = {key: cpu / seconds for key, cpu in spent.items()}
    return {
        "total": sum(used.values()),
        "workers": {key: c for key, c in sorted(used.items()) if key},
        "cpu_s": sum(spent.values()),
    }


@contextlib.contextmanager
def cores_used(server: http.Server) -> Iterator[dict]:
    """``with cores_used(server) as cores: ...``: on exit ``cores["cores"]`` holds ``cores_split`` over the block,
    the cores the server's processes used meanwhile, in all and per HTTP worker (with its work processes)."""
    out: dict = {}
    t0, before = time.monotonic(), _by_worker(server)
    yield out
    out["cores"] = cores_split(before, _by_worker(server), time.monotonic() - t0)


def requests_by_worker(metrics_text: str) -> dict[str, float]:
    """Our service's ``/metrics`` -> requests answered so far per HTTP worker (``mnist_http_requests_total``'s
    ``worker`` label, summed over endpoints and statuses)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "mnist_http_requests":
            for sample in family.samples:
                if sample.name == "mnist_http_requests_total":
                    worker = sample.labels.get("worker", "0")
                    out[worker] = out.get(worker, 0.0) + sample.value
    return out


@contextlib.contextmanager
def ours_used(server: http.Server) -> Iterator[dict]:
    """``cores_used`` for our service, and ``requests_by_worker``: how many requests each HTTP worker answered
    during the block (``out["worker_requests"]``, worker label -> count)."""

    def read() -> dict[str, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
            return requests_by_worker(response.read().decode())

    before = read()
    with cores_used(server) as out:
        yield out
    after = read()
    out["worker_requests"] = {w: int(n - before.get(w, 0.0)) for w, n in sorted(after.items())}


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


def watchers(live: dict[str, http.Server], ours: str = "bento") -> dict:
    """For ``bench.http.interleaved``'s ``watch``: each server's cores and CPU seconds in each of its windows, and
    for ``ours`` also the requests each of its HTTP workers answered."""
    return {name: functools.partial(ours_used if name == ours else cores_used, s) for name, s in live.items()}
