"""bench/overload.py's pure parts: hey's summary, saturation, the probes' summaries, and bodies the service's
limits (service/config.py) admit; and the report's rows for them."""

import http.server
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from bench import overload
from bench.report import overload_sections
from service.config import ServiceConfig
from service.http import multipart
from service.inputs.image_size import declared_pixels

LIMITS = ServiceConfig()
HEY_OUTPUT = """
Summary:
  Total:\t8.0213 secs
  Slowest:\t2.5000 secs
  Requests/sec:\t1234.5

Latency distribution:
  50% in 0.0100 secs
  99% in 1.2500 secs

Status code distribution:
  [200]\t812 responses
  [503]\t9000 responses

Error distribution:
  [3]\tPost "http://127.0.0.1:3311/predict": read tcp 127.0.0.1:51234->127.0.0.1:3311: read: connection reset by peer
  [2]\tPost "http://127.0.0.1:3311/predict": read tcp 127.0.0.1:51240->127.0.0.1:3311: read: connection reset by peer
  [1]\tPost "http://127.0.0.1:3311/predict": EOF
  [4]\tPost "http://127.0.0.1:3311/predict": context deadline exceeded (Client.Timeout exceeded while awaiting headers)
"""


def test_parse_hey_counts_statuses_and_errors_without_their_ports():
    parsed = overload.parse_hey(HEY_OUTPUT)
    assert parsed["seconds"] == pytest.approx(8.0213)
    assert parsed["p99_s"] == pytest.approx(1.25) and parsed["slowest_s"] == pytest.approx(2.5)
    assert parsed["statuses"] == {"200": 812, "503": 9000}
    assert parsed["errors"] == {
        "connection reset by peer": 5,
        "EOF": 1,
        "context deadline exceeded (Client.Timeout exceeded while awaiting headers)": 4,
    }
    assert overload.images_per_s(parsed, 64) == pytest.approx(812 * 64 / 8.0213)


def test_the_stress_rows_count_connection_errors_with_debians_hey():
    """bench/stress.py's rows (the 1,000-connection overload) read hey through the same parser: its own pattern
    missed the quoted URL of Debian's hey, and reported no connection error whatever happened."""
    from bench import stress

    parsed = stress.parse_hey(HEY_OUTPUT)
    assert parsed["statuses"] == {200: 812, 503: 9000} and parsed["p99_ms"] == 1250.0
    assert parsed["errors"]["connection reset by peer"] == 5 and sum(parsed["errors"].values()) == 10
    assert parsed["requests_per_s"] == 1234.5


def test_parse_hey_takes_the_slowest_for_p99_under_100_answers():
    parsed = overload.parse_hey(HEY_OUTPUT.replace("  99% in 1.2500 secs\n", ""))
    assert parsed["p99_s"] == parsed["slowest_s"] == pytest.approx(2.5)


def test_parse_hey_without_errors_or_answers():
    parsed = overload.parse_hey("Summary:\n  Total:\t1.0 secs\n\nStatus code distribution:\n")
    assert parsed == {"seconds": 1.0, "statuses": {}, "errors": {}, "p99_s": None, "slowest_s": None}
    assert overload.images_per_s(parsed, 64) == 0


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(1, 100.0), (2, 190.0), (4, 199.0), (8, 180.0)], 2),  # within 5% of the best at 2 clients
        ([(1, 100.0), (2, 190.0), (4, 240.0), (8, 230.0)], 4),
        ([(1, 100.0), (2, 60.0), (4, 210.0), (8, 220.0)], 4),  # a dip at 2 clients is not saturation
        ([(1, 100.0), (2, 190.0)], 2),  # still rising: the largest count
        ([(1, 0.0), (2, 0.0)], 1),
        ([(4, 10.0)], 4),
    ],
)
def test_saturation_point(points, expected):
    assert overload.saturation_point(points) == expected


def test_summarize_counts_failures_at_the_time_they_took():
    samples = [(0.01, "200")] * 97 + [(0.02, "503"), (10.0, "TimeoutError"), (0.001, "ConnectionResetError")]
    s = overload.summarize(samples)
    assert s["requests"] == 100 and s["ok_share"] == pytest.approx(0.97)
    assert s["outcomes"] == {"200": 97, "503": 1, "TimeoutError": 1, "ConnectionResetError": 1}
    assert s["p50_s"] == pytest.approx(0.01) and s["max_s"] == 10.0 and s["p99_s"] > 0.02


def test_summarize_of_nothing_is_a_failure_not_an_error():
    s = overload.summarize([])
    assert s["requests"] == 0 and s["ok_share"] == 0 and np.isnan(s["max_s"])


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_periodic_requests_on_fresh_connections_until_halted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        probes = [overload.Periodic(url + "/livez", None, "", 0.05, 2), overload.Periodic(url, b"x", "a/b", 0.05, 2)]
        for probe in probes:
            probe.start()
        threading.Event().wait(0.3)
        for probe in probes:
            probe.halt.set()
            probe.join()
    finally:
        server.shutdown()
        server.server_close()
    assert len(probes[0].samples) >= 2 and {o for _, o in probes[0].samples} == {"200"}
    assert {o for _, o in probes[1].samples} == {"503"}
    assert overload.timed_request(url, None, "", 2)[1] == "ConnectionRefusedError"


def test_bulk_bodies_hold_64_images_of_their_kind():
    for kind, size in (("bulk28", (28, 28)), ("bulk300", (375, 300))):
        body, ctype = overload.bulk_body(kind)
        parts = multipart.parse(body, ctype, "images", LIMITS.max_images_per_request, ())
        assert len(parts) == overload.IMAGES == LIMITS.max_images_per_request
        assert Image.open(io.BytesIO(parts[0].data)).size == size


def test_the_hog_png_request_is_legal_and_near_the_pixel_limit():
    w, h = overload.HOG_PNG_SIZE
    total = w * h * overload.HOG_PNG_IMAGES
    assert w * h <= LIMITS.max_image_pixels and LIMITS.max_request_pixels * 0.99 <= total <= LIMITS.max_request_pixels
    data = overload.paper_png(np.eye(28, dtype=np.uint8) * 255, overload.HOG_PNG_SIZE)  # one at full size
    assert declared_pixels(data, LIMITS.max_image_pixels) == w * h
    assert len(data) * overload.HOG_PNG_IMAGES < min(LIMITS.max_request_bytes, 3 * LIMITS.max_image_bytes) / 4


def test_paper_png_is_opaque_rgba_and_not_one_colour():
    image = Image.open(io.BytesIO(overload.paper_png(np.eye(28, dtype=np.uint8) * 255, (400, 300))))
    pixels = np.asarray(image)
    assert image.mode == "RGBA" and image.size == (400, 300) and (pixels[..., 3] == 255).all()
    assert len(np.unique(pixels[..., 0])) > 20


def test_the_padded_json_hog_is_legal_and_fills_31_mib():
    body, ctype = overload.hog_json_padded()
    assert ctype == "application/json"
    assert overload.HOG_JSON_BYTES - 64 * 28 * 28 <= len(body) <= overload.HOG_JSON_BYTES < LIMITS.max_request_bytes
    images = np.asarray(json.loads(body)["images"])
    digits, _ = overload.workloads.mnist_digits(overload.IMAGES)
    assert images.shape == (LIMITS.max_images_per_request, 28, 28) and np.array_equal(images, digits / 255.0)


def test_the_many_arrays_json_hog_fills_its_size_with_more_images_than_allowed():
    body, _ = overload.hog_json_many(size=2**20)
    images = json.loads(body)["images"]
    assert 2**20 - 8000 < len(body) <= 2**20 and len(images) > LIMITS.max_images_per_request
    assert np.asarray(images).shape[1:] == (28, 28)


def _probe(ok_share: float, p99: float) -> dict:
    return {"requests": 50, "ok_share": ok_share, "outcomes": {"200": 50}, "p50_s": 0.01, "p99_s": p99, "max_s": p99}


def test_report_states_each_target():
    hey = {"clients": 64, "seconds": 8.0, "statuses": {"200": 100, "503": 5}, "errors": {}, "images_per_s": 900.0}
    hey |= {"p99_s": 2.0, "slowest_s": 3.0, "cpu_s": 0.8}
    goodput = {"kind": "bulk28", "body_bytes": 2**20, "sweep": [{**hey, "clients": 4, "images_per_s": 1000.0}]}
    goodput |= {"saturation_clients": 4, "saturation_images_per_s": 1000.0, "overload": hey, "ratio": 0.9}
    goodput |= {"livez": _probe(1.0, 1.5), "lone": _probe(0.5, 0.2)}
    hog = {"hog": "png64mp", "what": "3 PNGs", "path": "/predict", "body_bytes": 2**20, "hogs": hey}
    hog |= {"lone": _probe(0.96, 0.9), "livez": _probe(1.0, 0.1)}
    text = "\n".join(overload_sections({"overload_goodput": [goodput], "fairness": [hog]}))
    assert "90% of saturation (target at least 90%: met); /livez max 1.50 s" in text
    assert "(target all within 1 s: **not met**); the lone client still answered: yes (50%)" in text
    assert "96% answered with 200 (target at least 95%: met), p99 0.90 s (target at most 1 s: met)" in text
    assert "| 10% of a core |" in text
