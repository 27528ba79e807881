"""bench/report.py's HTTP rows: our CPU per request against the in-process work and the best peer, the requests
each HTTP worker answered, and the 16-PNG rows' ratio; bench/peers/cpu.py's reading of /metrics per worker."""

from bench.peers.cpu import requests_by_worker
from bench.report import http_sections


def _row(server, scenario, rps, clients=8, **extra):
    per = {"png1": 1, "png16": 16}[scenario]
    row = {"server": server, "scenario": scenario, "concurrency": clients, "requests_per_s": rps}
    row |= {"images_per_s": rps * per, "p50_ms": 4.0, "p90_ms": 6.0, "p99_ms": 9.0, "errors": 0}
    return row | extra


def _text(rows, **http):
    return "\n".join(http_sections({"http": {"rows": rows, **http}}))


def test_cpu_per_request_is_stated_against_the_in_process_work_and_the_best_peer():
    rows = [
        _row("bento", "png1", 1500, cpu_ms=1.1, cores_used=1.9, worker_requests=[{"1": 600, "2": 400}]),
        _row("fastapi", "png1", 2000, cpu_ms=0.9, cores_used=1.8),
    ]
    text = _text(rows, work_ms=0.4)
    assert "**0.400 ms** a request" in text
    assert "| bento | 1 PNG | 8 | 1,500 | 4.0 | 6.0 | 9.0 | 0 | 1.10 | 1.90 |" in text
    assert (
        "CPU per request: 1.10 ms, 2.8x the in-process work (target at most 2.5x: **not met**); fastapi's 0.90" in text
    )
    assert "Requests per HTTP worker, each window: 60% / 40%." in text
    rows[0]["cpu_ms"] = 0.9
    assert "2.2x the in-process work (target at most 2.5x: met)" in _text(rows, work_ms=0.4)


def test_without_cpu_readings_the_rows_still_print():
    text = _text([_row("bento", "png1", 1500), _row("fastapi", "png1", 1000)])
    assert "| bento | 1 PNG | 8 | 1,500 | 4.0 | 6.0 | 9.0 | 0 |  |  |" in text
    assert "CPU per request" not in text and "**1.50x**" in text


def test_sixteen_png_rows_compare_images_per_second_with_the_best_peer():
    rows = [_row("bento", "png16", 330), _row("fastapi", "png16", 250), _row("litserve", "png16", 200)]
    text = _text(rows)
    assert "### 16 PNGs per request, 8 clients" in text
    assert "| bento | 5,280 | 330 | 4 | 9 | 0 |  |  |" in text
    assert "the best peer, fastapi, 4,000, p99 9 ms: **1.32x**. Targets: at least 1.2x: met" in text
    assert "16 PNGs" not in _text([_row("bento", "png1", 1)])


def test_requests_per_worker_come_from_the_worker_label_summed_over_endpoints_and_statuses():
    text = """# HELP mnist_http_requests_total HTTP requests
# TYPE mnist_http_requests_total counter
mnist_http_requests_total{endpoint="predict",status="200",worker="1"} 10.0
mnist_http_requests_total{endpoint="predict",status="503",worker="1"} 2.0
mnist_http_requests_total{endpoint="health",status="200",worker="2"} 5.0
# HELP mnist_predictions_total Images answered
# TYPE mnist_predictions_total counter
mnist_predictions_total{digit="7"} 99.0
"""
    assert requests_by_worker(text) == {"1": 12.0, "2": 5.0}
