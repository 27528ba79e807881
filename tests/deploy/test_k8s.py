"""The Kubernetes manifests, rendered offline with `kubectl kustomize` and validated against Kubernetes' schemas."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
# the oldest and newest Kubernetes versions the manifests are checked against
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
VARIANTS = {"base": ("mnist-classifier", "bentofile.yaml"), "gpu": ("mnist-classifier-gpu", "bentofile.gpu.yaml")}
BENTO_UID = 1034  # the uid of the `bentoml` user BentoML's Dockerfile creates


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request) -> tuple[str, dict[str, dict]]:
    """One kustomization rendered: (variant, {kind: object})."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / request.param)], capture_output=True, text=True, check=True
    ).stdout
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    by_kind = {obj["kind"]: obj for obj in objects}
    assert len(by_kind) == len(objects), "one object of each kind"
    return request.param, by_kind


def pod_spec(objects: dict) -> dict:
    return objects["Deployment"]["spec"]["template"]["spec"]


def container(objects: dict) -> dict:
    (only,) = pod_spec(objects)["containers"]
    return only


def env(objects: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects)["env"] if "value" in e}  # not those from Secrets


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(rendered, version):
    _, objects = rendered
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, version, strict=True)  # raises with the path of the first problem


def test_probes_use_bentomls_health_endpoints_on_the_served_port(rendered):
    _, objects = rendered
    c = container(objects)
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": 3000}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "3000",
        "prometheus.io/path": "/metrics",
    }


def test_runs_as_the_images_non_root_user_on_a_read_only_file_system(rendered):
    _, objects = rendered
    pod = pod_spec(objects)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == BENTO_UID
    c = container(objects)["securityContext"]
    assert c["allowPrivilegeEscalation"] is False
    assert c["capabilities"] == {"drop": ["ALL"]}
    assert c["readOnlyRootFilesystem"] is True
    # BentoML writes its state under BENTOML_HOME: it must be on the one writable volume
    (mount,) = container(objects)["volumeMounts"]
    assert env(objects)["BENTOML_HOME"].startswith(mount["mountPath"] + "/")
    assert {v["name"] for v in pod_spec(objects)["volumes"]} == {mount["name"]}


def test_grace_period_covers_the_pre_stop_wait_and_the_drain(rendered):
    _, objects = rendered
    sleep = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = int(env(objects)["MNIST_DRAIN_S"])
    # Kubernetes counts the grace period from the start of preStop; what is left after the drain is for the
    # requests still in flight and the exit
    assert pod_spec(objects)["terminationGracePeriodSeconds"] >= int(sleep[1]) + drain + 10


def test_selectors_pick_this_variants_pods_only(rendered):
    variant, objects = rendered
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/variant"] == ("cpu" if variant == "base" else "gpu")
    selectors = [
        objects["Deployment"]["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert "app.kubernetes.io/variant" in selector
        assert selector.items() <= labels.items()
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objects["Deployment"]["metadata"]["name"])
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2  # the PDB lets one go at a time


def test_image_is_the_variants_bento_and_only_gpu_asks_for_a_gpu(rendered):
    variant, objects = rendered
    bento_name, bentofile = VARIANTS[variant]
    assert yaml.safe_load((REPO / bentofile).read_text())["name"] == bento_name
    assert container(objects)["image"].split(":")[0] == bento_name
    limits = container(objects)["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (1 if variant == "gpu" else None)


def test_the_feedback_store_url_comes_from_an_optional_secret(rendered):
    env = {e["name"]: e for e in container(rendered[1])["env"]}
    ref = env["MNIST_FEEDBACK_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mnist-feedback", "key": "url", "optional": True}  # a pod starts without it (SQLite)
