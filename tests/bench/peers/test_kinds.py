"""bench/peers/kinds.py's pure parts: the mix's order, the bodies wrk sends, and the cores split per HTTP worker
(bench/peers/cpu.py); bench/http.py's wrk with several bodies against a local server; the report's rows for them."""

import collections
import contextlib
import email.parser
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bench import http, workloads
from bench.peers import kinds
from bench.peers.cpu import cores_split
from bench.report import http_sections, kinds_section


def test_mix_order_follows_the_weights_with_each_kind_spread_out():
    order = kinds.mix_order(workloads.MIX)
    assert collections.Counter(order) == workloads.MIX
    assert kinds.mix_order(workloads.MIX) == order  # the same every run
    around = order + order[:2]  # wrk goes round the cycle
    assert all(len({a, b, c}) > 1 for a, b, c in zip(around, around[1:], around[2:]))  # no kind thrice in a row
    assert all(a != b for a, b in zip(around, around[1:]) if a != "canvas")  # only the 6-in-10 kind twice
    assert kinds.mix_order({"a": 1, "b": 1}) == ["a", "b"]


def _files(body: bytes, ctype: str) -> list[tuple[str, str, bytes]]:
    message = email.parser.BytesParser().parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    return [
        (p.get_param("name", header="content-disposition"), p.get_content_type(), p.get_payload(decode=True))
        for p in message.get_payload()
    ]


def test_a_mix_is_several_bodies_under_one_content_type_and_a_kind_is_one():
    png, jpeg = b"\x89PNG\r\n\x1a\nrest", b"\xff\xd8\xff\xe0rest"
    mix = kinds.Workload(kinds.MIX, (png, jpeg, png))
    bodies, ctype = mix.request()
    assert isinstance(bodies, list) and len(bodies) == 3
    assert [_files(b, ctype) for b in bodies] == [
        [("images", "image/png", png)],
        [("images", "image/jpeg", jpeg)],
        [("images", "image/png", png)],
    ]
    one, ctype1 = kinds.Workload("photo_1mp", (jpeg,)).request()
    assert isinstance(one, bytes) and _files(one, ctype1) == [("images", "image/jpeg", jpeg)]
    assert mix.mean_bytes == pytest.approx((2 * len(png) + len(jpeg)) / 3)


def test_workloads_show_their_own_digits_in_the_configured_kinds():
    digits = np.zeros((64, 28, 28), dtype=np.uint8)
    for i in range(64):
        digits[i, 4 : 4 + i % 20, 10:14] = 255  # a bar of its own length: every digit distinct
    cfg = kinds.KindsConfig(kinds=("canvas", "screenshot_300"), mix_cycles=1)
    made = kinds.workloads_for(cfg, digits)
    assert [w.name for w in made] == ["canvas", "screenshot_300", kinds.MIX]
    assert all(len(w.files) == 1 for w in made[:2])
    assert len(made[2].files) == sum(workloads.MIX.values())
    assert made[2].files[0] == workloads.make("canvas", digits[kinds.MIX_FIRST_DIGIT], seed=0)
    assert made[2].files[6][:3] == b"\xff\xd8\xff"  # the seventh of the cycle is the photo, a JPEG
    assert kinds.workloads_for(kinds.KindsConfig(kinds=(), mix=False), digits) == []


class _Recorder(BaseHTTPRequestHandler):
    """Counts the bodies and content types POSTed to it; answers 500 to a body that starts with "bad"."""

    protocol_version = "HTTP/1.1"
    seen: collections.Counter

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen[body, self.headers["Content-Type"]] += 1
        self._answer(500 if body.startswith(b"bad") else 200)

    def do_GET(self):
        self._answer(200)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    if not shutil.which("wrk"):
        pytest.skip("wrk is not installed (make bench-deps)")
    handler = type("Handler", (_Recorder,), {"seen": collections.Counter()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda *args: None  # wrk drops its connections at the window's end
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    server.shutdown()
    server.server_close()


def test_wrk_sends_several_bodies_in_turn_and_counts_failures_as_errors(recorder):
    url, seen = recorder
    bodies = [b"first", b"second", b"bad third", b"fourth"]
    result = http.wrk(url + "/p", bodies, "text/x-test", 2, 1)
    sent = {body: n for (body, ctype), n in seen.items() if ctype == "text/x-test"}
    assert set(sent) == set(bodies)
    assert max(sent.values()) - min(sent.values()) <= 4  # two threads, each around the list from its own start
    # the server also saw the requests wrk abandoned at the window's end (up to one per connection)
    assert sent[b"bad third"] - 2 <= result["errors"] <= sent[b"bad third"] and result["errors"] > 0


def test_wrk_with_one_body_sends_it_as_before(recorder):
    url, seen = recorder
    result = http.wrk(url + "/p", b"only", "text/one", 2, 1, {"X-Extra": "1"})
    assert set(seen) == {(b"only", "text/one")} and result["errors"] == 0 and result["requests_per_s"] > 0


def test_interleaved_adds_what_a_watch_measured_to_that_servers_windows_only(recorder):
    url, _ = recorder
    port = int(url.rsplit(":", 1)[1])
    live = {name: http.Server(name, [], "/ready", port=port) for name in ("a", "b")}
    calls = []

    @contextlib.contextmanager
    def watch():
        out = {}
        calls.append("in")
        yield out
        out["cores"] = {"total": 1.5, "workers": {}}

    loads = {name: ("/p", [b"x", b"y"], "text/plain", 1) for name in live}
    windows = http.interleaved(live, loads, 2, 1, watch={"a": watch})
    assert calls == ["in"]  # the window, not the warm-up
    assert windows["a"][0]["cores"]["total"] == 1.5 and "cores" not in windows["b"][0]


def test_cores_split_per_worker_counts_a_new_worker_from_zero():
    before = {"": 1.0, "worker 1": 10.0, "worker 2": 20.0}
    after = {"": 1.5, "worker 1": 14.0, "worker 2": 23.0, "pid 99": 0.5}
    cores = cores_split(before, after, 2.0)
    assert cores["workers"] == {"pid 99": 0.25, "worker 1": 2.0, "worker 2": 1.5}
    assert cores["total"] == pytest.approx(0.25 + 0.25 + 2.0 + 1.5)


def _row(server: str, scenario: str, rps: float, **extra) -> dict:
    row = {"server": server, "scenario": scenario, "concurrency": 8, "requests_per_s": rps, "images_per_s": rps}
    return row | {"p50_ms": 10.0, "p99_ms": 40.0, "errors": 0, "windows": 2, "other_cpu_share": 0.25} | extra


def test_report_rows_per_input_with_ours_over_the_best_peer_and_our_cores():
    cores = [{"total": 1.8, "workers": {"worker 1": 0.95, "worker 2": 0.8}}, {"total": 1.7, "workers": {}}]
    rows = [
        _row("litserve", "canvas", 400),
        _row("bento", "canvas", 600, cores=cores, cpu_ms=1.25, worker_requests=[{"1": 300, "2": 100}, {"1": 1}]),
        _row("fastapi", "canvas", 300),
        _row("bento", kinds.MIX, 100, cores=cores[:1]),
        _row("torchserve", kinds.MIX, 200, errors=7),
    ]
    result = {
        "config": {"clients": 8, "rounds": 2, "window_s": 4, "mix_cycles": 2, "kinds": ["canvas"]},
        "mix": dict(workloads.MIX),
        "body_bytes": {"canvas": 9000, kinds.MIX: 3 * 2**20},
        "rows": rows,
        "checks": {"bento": "24 files: same answers", "fastapi": "**differs** on 1 of 24 files"},
        "seconds": 271.4,
    }
    text = "\n".join(kinds_section(result))
    lines = text.splitlines()
    assert "| canvas (9 KiB) | bento | 600 | 600 | 10.0 | 40.0 | 0 | 1.25 | **1.50x** | 25% |" in lines
    assert "|  | litserve | 400 | 400 | 10.0 | 40.0 | 0 |  |  |  |" in lines
    assert "| mix (3.0 MiB) | torchserve | 200 | 200 | 10.0 | 40.0 | 7 |  |  | 25% |" in lines
    assert "|  | bento | 100 | 100 | 10.0 | 40.0 | 0 |  | **0.50x** |  |" in lines
    assert (
        "- canvas: total 1.80 (worker 1 0.95, worker 2 0.80); total 1.70 Requests per HTTP worker, each window: "
        "75% / 25%, 100%." in lines
    )
    assert "- mix: total 1.80 (worker 1 0.95, worker 2 0.80)" in lines
    assert "- fastapi: **differs** on 1 of 24 files" in lines
    assert "20 bodies" in text  # two cycles of the mix's ten
    assert "these rows took 271 s" in text
    assert kinds_section(None) == [] and kinds_section({**result, "rows": []}) == []
    assert text in "\n".join(http_sections({"http": {"rows": [], "kinds": result}}))  # in make bench's report
