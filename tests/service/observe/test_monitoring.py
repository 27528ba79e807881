"""Model-monitoring metrics on /metrics, and the Grafana dashboard for them (deploy/grafana/): every query
names only metrics the service exports. No Grafana runs here; the names come from a real server's /metrics."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import BOOK_IMAGE, REPO
from tests.promql import family, metric_names, service_metric_names

pytestmark = pytest.mark.slow
DASHBOARD = REPO / "deploy" / "grafana" / "mnist-dashboard.json"
# labelled series that are on /metrics only once a labelled answer has come in (feedback, online accuracy) or the
# drift window is full: those are checked against the names service/ defines
SHOWN_LATER = {
    "mnist_feedback",
    "mnist_online_accuracy",
    "mnist_online_accuracy_labels",
    "mnist_drift_score",
    "mnist_drift_threshold",
}


def exported_families(server: str) -> set[str]:
    httpx.post(server + "/predict", files=[("images", ("b.png", BOOK_IMAGE.read_bytes(), "image/png"))])
    httpx.post(server + "/predict", files=[("images", ("x.png", b"not an image", "image/png"))])
    text = httpx.get(server + "/metrics").text
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_every_dashboard_query_names_an_exported_metric(server):
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 10
    families, defined = exported_families(server), service_metric_names()
    for query in queries:
        metrics = metric_names(query)
        assert metrics, query
        for name in metrics:
            if family(name) in SHOWN_LATER:
                assert family(name) in defined, f"{name} (in {query!r}) is not a metric of service/"
            else:
                assert family(name) in families or name in families, f"{name} (in {query!r}) is not on /metrics"


def test_the_low_confidence_share_is_on_the_dashboard():
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    assert any('mnist_prediction_confidence_bucket{le="0.5"}' in q and "[5m]" in q for q in queries)


def _sample(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else "")) and (not labels or wanted in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_what_the_model_is_asked_is_counted(server, mnist_test):
    from tests.service.conftest import png_bytes

    images, labels = mnist_test
    ones = [i for i in range(200) if labels[i] == 1][:5]
    before = httpx.get(server + "/metrics").text
    files = [("images", (f"{i}.png", png_bytes(images[i].numpy()), "image/png")) for i in ones]
    assert [r["digit"] for r in httpx.post(server + "/predict", files=files).json()] == [1] * len(ones)
    assert httpx.post(server + "/predict", files=[("images", ("x.png", b"nope", "image/png"))]).status_code == 400
    after = httpx.get(server + "/metrics").text
    assert _sample(after, "mnist_predictions_total", digit="1") - _sample(
        before, "mnist_predictions_total", digit="1"
    ) == len(ones)
    assert _sample(after, "mnist_prediction_confidence_count") - _sample(
        before, "mnist_prediction_confidence_count"
    ) == len(ones)
    assert (
        _sample(after, "mnist_rejected_total", reason="not_an_image")
        - _sample(before, "mnist_rejected_total", reason="not_an_image")
        == 1
    )
    assert _sample(after, "mnist_preprocess_seconds_count") > _sample(before, "mnist_preprocess_seconds_count")
