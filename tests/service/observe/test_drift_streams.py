"""The drift targets (issue 20) on the real serving path: the book's export, its drift section, real work processes
behind the core, image files one per request. MNIST test digits stay under every threshold; a stream where one
digit is 60% of the traffic, or of thick-stroke photos of digits, crosses one within 500 requests. And on a real
`bentoml serve`, the scores and thresholds are on /metrics, the scores only once a window is full."""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from scipy import ndimage

from export.samples import realistic
from service.config import ServiceConfig
from service.core import Core
from service.engine.batcher import start_batcher
from service.engine.messages import InputKind
from service.observe.drift import QUANTITIES, DriftMonitor
from tests.service.conftest import png_bytes, serve

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)  # the measured scores, for the README (pytest -o log_cli=true --log-cli-level=INFO)
WINDOW = 200  # MNIST_DRIFT_WINDOW's default
WITHIN = 500  # requests: the target
CONCURRENT = 8  # requests in flight at once, so that the work processes batch them
SKEWED_DIGIT, SKEWED_SHARE = 7, 0.6


class Traced(DriftMonitor):
    """The shipped monitor, keeping the scores after each request it observes."""

    trace: list

    def observe(self, answer, stats):
        super().observe(answer, stats)
        self.trace.append(self.scores())


@pytest.fixture(scope="module")
def core(book_export):
    config = ServiceConfig(drift_window=WINDOW)
    batcher = start_batcher(book_export.out, book_export.manifest, config)
    core = Core(config, book_export.manifest, "mnist-convnet:drift", batcher)
    yield core
    core.close()


def stream(core: Core, files: list[bytes]) -> Traced:
    """Every file as its own request through the core, with a fresh window; the monitor, with its trace."""
    monitor = Traced.from_manifest(core.manifest, WINDOW)
    monitor.trace = []
    core.drift = monitor

    async def send():
        for i in range(0, len(files), CONCURRENT):
            await asyncio.gather(*(core.classify(InputKind.ENCODED, [f], 1) for f in files[i : i + CONCURRENT]))

    asyncio.run(send())
    assert len(monitor.trace) == len(files)
    return monitor


def first_crossing(monitor: Traced, name: str) -> tuple[int | None, list[str]]:
    """The request after which some score first passed its threshold (1-based), and which scores did."""
    thresholds = {r.name: r.threshold for r in monitor.refs}
    worst = {q: max(s[q] for s in monitor.trace if s) for q in thresholds}
    log.info("%s: highest score / threshold: %s", name, {q: f"{worst[q]:.4f}/{thresholds[q]:.4f}" for q in worst})
    for i, scores in enumerate(monitor.trace, 1):
        over = [q for q, s in (scores or {}).items() if s > thresholds[q]]
        if over:
            log.info("%s: first over a threshold after request %d: %s", name, i, over)
            return i, over
    return None, []


def test_the_export_records_the_drift_section(book_export):
    section = book_export.manifest["drift"]
    assert section["method"] == "jensen-shannon" and set(section["quantities"]) == set(QUANTITIES)
    assert str(WINDOW) in section["thresholds"]


def test_mnist_test_digits_stay_under_every_threshold(core, mnist_test):
    images, _ = mnist_test
    picks = np.random.default_rng(20).choice(len(images), 1500, replace=False)
    monitor = stream(core, [png_bytes(images[i].numpy()) for i in picks])
    full = [s for s in monitor.trace if s is not None]
    assert len(full) == len(picks) - WINDOW + 1
    assert first_crossing(monitor, "MNIST test digits") == (None, [])
    for ref in monitor.refs:
        worst = max(s[ref.name] for s in full)
        assert worst < ref.threshold, f"{ref.name}: {worst:.4f} >= {ref.threshold:.4f}"


def test_one_digit_at_60_percent_crosses_the_digit_threshold(core, mnist_test):
    images, labels = mnist_test
    rng = np.random.default_rng(21)
    sevens, others = np.flatnonzero(labels.numpy() == SKEWED_DIGIT), np.flatnonzero(labels.numpy() != SKEWED_DIGIT)
    picks = [rng.choice(sevens) if rng.random() < SKEWED_SHARE else rng.choice(others) for _ in range(WITHIN)]
    monitor = stream(core, [png_bytes(images[i].numpy()) for i in picks])
    at, over = first_crossing(monitor, f"{SKEWED_SHARE:.0%} {SKEWED_DIGIT}s")
    assert at is not None and at <= WITHIN and "digit" in over, (at, over, monitor.trace[-1])


def thick_photo(digit_u8: np.ndarray, seed: int) -> bytes:
    """A photo of the digit on paper (export/samples/realistic.py), drawn with a pen two pixels thicker."""
    return realistic.make("paper_photo", ndimage.grey_dilation(digit_u8, size=(3, 3)), seed)


def test_thick_stroke_photos_cross_a_threshold(core, mnist_test):
    images, _ = mnist_test
    picks = np.random.default_rng(22).choice(len(images), WITHIN, replace=False)
    monitor = stream(core, [thick_photo(images[i].numpy(), 5_000_000 + int(i)) for i in picks])
    at, over = first_crossing(monitor, "thick-stroke photos")
    assert at is not None and at <= WITHIN, monitor.trace[-1]
    assert {"ink", "stroke_width"} & set(monitor.over()), monitor.trace[-1]


def metric_samples(text: str, name: str) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}\{{quantity="(\w+)"\}} (\S+)$', text, re.MULTILINE)
    }


def test_bentoml_serve_exports_the_scores_once_a_window_is_full(book_export, mnist_test, tmp_path):
    images, labels = mnist_test
    rng = np.random.default_rng(23)
    sevens, others = np.flatnonzero(labels.numpy() == SKEWED_DIGIT), np.flatnonzero(labels.numpy() != SKEWED_DIGIT)
    picks = [rng.choice(sevens) if rng.random() < SKEWED_SHARE else rng.choice(others) for _ in range(WITHIN)]
    files = [png_bytes(images[i].numpy()) for i in picks]
    with serve(tmp_path, MNIST_WORKERS=2, MNIST_DRIFT_WINDOW=WINDOW) as served:
        before = httpx.get(served.url + "/metrics").text
        assert metric_samples(before, "mnist_drift_score") == {}  # no window is full yet
        thresholds = metric_samples(before, "mnist_drift_threshold")
        assert thresholds == pytest.approx(book_export.manifest["drift"]["thresholds"][str(WINDOW)])

        def send(part: list[bytes]) -> None:
            with httpx.Client(base_url=served.url, timeout=30) as client:
                for data in part:
                    r = client.post("/predict", files=[("images", ("d.png", data, "image/png"))])
                    assert r.status_code == 200, r.text

        with ThreadPoolExecutor(CONCURRENT) as pool:
            list(pool.map(send, [files[k::CONCURRENT] for k in range(CONCURRENT)]))
        after = httpx.get(served.url + "/metrics").text
    assert "# TYPE mnist_drift_score gauge" in after
    scores = metric_samples(after, "mnist_drift_score")  # one series per quantity: the largest of the workers'
    log.info("bentoml serve, 2 workers, %d requests: /metrics scores %s", WITHIN, scores)
    assert set(scores) == set(QUANTITIES)
    assert scores["digit"] > thresholds["digit"], (scores, thresholds)
