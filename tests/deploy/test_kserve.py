"""The KServe manifests (an InferenceService on a ServingRuntime that runs the bento's image as a v2 predictor),
rendered offline and checked field by field against the models KServe's and Kubernetes' Python clients are
generated from: an unknown or misspelled field anywhere fails, as the API server's schema would."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

kserve_models = pytest.importorskip("kserve.models", reason="kserve is in the dev extra")
k8s_models = pytest.importorskip("kubernetes.client.models", reason="kubernetes comes with kserve")
MODEL_OF = {"ServingRuntime": "V1alpha1ServingRuntime", "InferenceService": "V1beta1InferenceService"}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def _model(name: str):
    return getattr(kserve_models, name, None) or getattr(k8s_models, name)


def check(value, type_name: str, path: str) -> None:
    """``value`` is a valid ``type_name`` (an OpenAPI type string of the generated clients)."""
    if type_name in PRIMITIVES:
        if type_name == "str" and isinstance(value, (int, float)) and path.endswith(("containerPort", "port")):
            return  # IntOrString, which the generators type as str
        assert isinstance(value, PRIMITIVES[type_name]), f"{path}: expected {type_name}, got {value!r}"
        return
    if m := re.fullmatch(r"(?i)list\[(.+)\]", type_name):
        assert isinstance(value, list), f"{path}: expected a list"
        for i, item in enumerate(value):
            check(item, m.group(1), f"{path}[{i}]")
        return
    if m := re.fullmatch(r"(?i)dict[\[(]str, (.+)[\])]", type_name):
        assert isinstance(value, dict), f"{path}: expected a mapping"
        for key, item in value.items():
            check(item, m.group(1), f"{path}.{key}")
        return
    model = _model(type_name)
    assert isinstance(value, dict), f"{path}: expected an object ({type_name})"
    json_to_attr = {json_key: attr for attr, json_key in model.attribute_map.items()}
    for key, item in value.items():
        assert key in json_to_attr, f"{path}: {type_name} has no field {key!r}"
        check(item, model.openapi_types[json_to_attr[key]], f"{path}.{key}")


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy" / "k8s" / "kserve")], capture_output=True, text=True, check=True
    ).stdout
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out) if doc}


def test_each_object_matches_kserves_schema(objects):
    assert set(objects) == set(MODEL_OF)
    for kind, obj in objects.items():
        check(obj, MODEL_OF[kind], kind)


def test_the_validator_catches_a_misspelled_field(objects):
    broken = yaml.safe_load(yaml.safe_dump(objects["InferenceService"]))
    broken["spec"]["predictor"]["model"]["protocolversion"] = "v2"
    with pytest.raises(AssertionError, match="has no field 'protocolversion'"):
        check(broken, MODEL_OF["InferenceService"], "InferenceService")


def test_a_v2_predictor_probed_on_the_v2_health_paths(objects):
    service, runtime = objects["InferenceService"], objects["ServingRuntime"]
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    (container,) = runtime["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["image"].startswith("mnist-classifier")
    assert container["securityContext"]["runAsNonRoot"] is True
    drain = int(next(e["value"] for e in container["env"] if e["name"] == "MNIST_DRAIN_S"))
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] > pre_stop + drain
