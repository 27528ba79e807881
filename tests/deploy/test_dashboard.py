"""The Grafana dashboard (deploy/grafana/) as a file: unique ids, panels inside the 24-column grid and not on top
of each other, every query reading metrics that service/ defines. No Grafana runs here; the slow
tests/service/observe/test_monitoring.py checks the names against a real server's /metrics."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.promql import family, metric_names, service_metric_names

DASHBOARD = json.loads((REPO / "deploy" / "grafana" / "mnist-dashboard.json").read_text())
PANELS = DASHBOARD["panels"]
GRID_COLUMNS = 24


def cells(panel: dict) -> set[tuple[int, int]]:
    g = panel["gridPos"]
    return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}


def test_panel_ids_are_unique_and_panels_do_not_overlap():
    assert len({p["id"] for p in PANELS}) == len(PANELS)
    taken: dict[tuple[int, int], int] = {}
    for panel in PANELS:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= GRID_COLUMNS, panel["title"]
        for cell in cells(panel):
            assert cell not in taken, f"panel {panel['id']} lies on panel {taken[cell]}"
            taken[cell] = panel["id"]


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: str(p["id"]))
def test_every_query_reads_metrics_the_service_defines(panel):
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    defined = service_metric_names()
    refs = [t["refId"] for t in panel["targets"]]
    assert refs and len(set(refs)) == len(refs)
    for target in panel["targets"]:
        names = metric_names(target["expr"])
        assert names, target["expr"]
        assert {family(n) for n in names} <= defined, f"{target['expr']!r} reads a metric service/ does not define"


def test_the_feedback_loop_is_on_the_dashboard():
    queries = " ".join(t["expr"] for p in PANELS for t in p["targets"])
    for name in ("mnist_online_accuracy", "mnist_online_accuracy_threshold", "mnist_feedback_total"):
        assert name in queries
    assert "mnist_drift_score" in queries and "mnist_drift_threshold" in queries
    (confusion,) = [p for p in PANELS if "sum by (true_digit, answered)" in p["targets"][0]["expr"]]
    assert confusion["type"] == "table" and confusion["targets"][0]["instant"] is True
    (matrix,) = confusion["transformations"]
    assert matrix["options"] == {"rowField": "true_digit", "columnField": "answered", "valueField": "Value"}
