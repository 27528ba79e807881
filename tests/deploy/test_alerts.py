"""The Prometheus alert rules (deploy/prometheus/): `promtool check rules` and their unit tests on synthetic series
(`promtool test rules`, Debian's `prometheus` package, which `make test` installs where it can), and the
PrometheusRule under deploy/k8s/monitoring holding the very same groups. Without promtool the promtool tests
skip with the reason, except on CI (CI=true), where they fail: there `make test` must have installed it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO
from tests.promql import family, metric_names, service_metric_names

RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"
MONITORING = REPO / "deploy" / "k8s" / "monitoring"
SEVERITIES = {"warning", "critical"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is missing (Debian: apt-get install prometheus; `make test` installs it where it can)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(reason + ": on CI it must be there", pytrace=False)
        pytest.skip(reason)
    return path


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_the_rules(promtool):
    run = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in run.stdout


def test_the_rules_pass_their_unit_tests(promtool):
    # run from the rules' folder: alerts_test.yml names alerts.yml relative to itself
    run = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_is_tested_firing_and_silent():
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in alerts():
        name = alert["alert"]
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name}: no test where it fires"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), f"{name}: no test where it is silent"


def test_every_alert_says_how_bad_what_and_where_to_read_on():
    readme = (REPO / "README.md").read_text()
    assert "**Alerts.**" in readme
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        assert alert.get("for"), f"{name}: fires on one evaluation"
        annotations = alert["annotations"]
        assert "$value" in annotations["summary"] and "$value" in annotations["description"], name
        assert annotations["runbook"] == f'README.md, "Service" > "Alerts": {name}'
        assert f"`{name}`" in readme, f"README's Alerts paragraph does not say what to do about {name}"


def test_every_metric_an_alert_reads_is_one_the_service_defines():
    defined = service_metric_names()
    for alert in alerts():
        names = metric_names(alert["expr"])
        assert names, alert["alert"]
        for name in names:
            assert family(name) in defined, f"{alert['alert']} reads {name}, which service/ does not define"


def test_the_prometheusrule_holds_the_same_groups():
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "deploy/k8s/monitoring/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: copy alerts.yml's "
        "groups under spec:"
    )
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["prometheusrule.yaml"]
    # apart from the base: a cluster without the Prometheus Operator's CRD refuses the kind
    base = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "kustomization.yaml").read_text())
    assert not any("prometheusrule" in resource.lower() for resource in base["resources"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_monitoring_kustomization_renders_the_rule():
    out = subprocess.run(["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, check=True).stdout
    (rule,) = [doc for doc in yaml.safe_load_all(out) if doc]
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ('sum by (le, endpoint) (rate(mnist_x_bucket{endpoint=~"a|b"}[5m]))', {"mnist_x_bucket"}),
        ("max by (model) (a) < on () group_left max(b) and on (model) c >= 0.9", {"a", "b", "c"}),
        ("histogram_quantile(0.99, sum by (le) (rate(d[$__rate_interval]))) > 1e-3", {"d"}),
    ],
)
def test_metric_names_are_read_out_of_a_query(query, names):
    assert metric_names(query) == names
