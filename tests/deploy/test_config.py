"""The container build's settings agree with each other: bentofiles, the base-image script, the Dockerfile template,
BentoML's own Dockerfile, and the wheel index the build installs from."""

from __future__ import annotations

import http.client
import re
from importlib import resources

import pytest
import yaml

from deploy import wheelhouse
from deploy.container import INDEX_BUILD_ARGS, LOCAL_BASE_IMAGE, UV_VERSION
from tests.conftest import REPO

BENTOFILES = ("bentofile.yaml", "bentofile.gpu.yaml")
BASE_IMAGE_SCRIPT = (REPO / "deploy" / "base-image.sh").read_text()


@pytest.mark.parametrize("bentofile", BENTOFILES)
def test_bentofiles_build_on_the_local_base_through_the_template(bentofile):
    docker = yaml.safe_load((REPO / bentofile).read_text())["docker"]
    # no cuda_version: BentoML would switch to an nvidia/cuda template that cannot install pip packages
    assert docker == {"base_image": LOCAL_BASE_IMAGE, "dockerfile_template": "deploy/Dockerfile.template"}


def test_base_image_script_builds_what_the_bentofiles_name_with_the_python_the_wheels_are_for():
    assert re.search(r"^TAG=\$\{1:-(\S+)\}$", BASE_IMAGE_SCRIPT, re.M).group(1) == LOCAL_BASE_IMAGE
    assert f"python:{wheelhouse.PYTHON_VERSION}-bookworm" in LOCAL_BASE_IMAGE
    assert re.search(r"^UV_VERSION=(\S+)$", BASE_IMAGE_SCRIPT, re.M).group(1) == UV_VERSION


def test_base_images_uv_satisfies_bentomls_dockerfile():
    """BentoML's Dockerfile pip-installs its pinned uv unless the base has one at least as new: with an older
    one the air-gapped build would need PyPI for it."""
    templates = resources.files("bentoml._internal.container.frontend.dockerfile.templates")
    pinned = re.search(r"uv==([\d.]+)", (templates / "_macros.j2").read_text()).group(1)
    assert tuple(map(int, UV_VERSION.split("."))) >= tuple(map(int, pinned.split(".")))


def test_template_declares_the_index_build_arguments():
    template = (REPO / "deploy" / "Dockerfile.template").read_text()
    assert "{% extends bento_base_template %}" in template
    for name in INDEX_BUILD_ARGS:
        assert re.search(rf"^ARG {name}$", template, re.M), name


def test_gpu_bento_runs_onnx_runtime_with_cuda_from_pypi_and_no_torch():
    packages = yaml.safe_load((REPO / "bentofile.gpu.yaml").read_text())["python"]["packages"]
    assert "onnxruntime-gpu[cuda,cudnn]==1.26.0" in packages
    assert not any(re.match(r"(torch|onnxruntime)\b(?!-gpu)", p) for p in packages)


def test_platform_tags_stop_at_the_base_images_glibc():
    tags = wheelhouse.platform_tags()
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_28_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags


@pytest.mark.parametrize(
    "wheel, project",
    [
        ("typing_extensions-4.16.0-py3-none-any.whl", "typing-extensions"),
        ("onnxruntime_gpu-1.26.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", "onnxruntime-gpu"),
        ("PyYAML-6.0.4-cp311-cp311-manylinux_2_17_x86_64.whl", "pyyaml"),
        ("zope.interface-7.0-cp311-cp311-manylinux_2_17_x86_64.whl", "zope-interface"),
    ],
)
def test_project_names_are_pep503_normalized(wheel, project):
    assert wheelhouse.project_name(wheel) == project


def test_index_serves_each_wheel_under_its_project(tmp_path):
    files, index = tmp_path / "files", tmp_path / "simple"
    files.mkdir()
    (files / "typing_extensions-4.16.0-py3-none-any.whl").write_bytes(b"wheel bytes")
    wheelhouse._layout_index(files, index)
    with wheelhouse.serve(index) as url:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", "/typing-extensions/")
        listing = conn.getresponse().read().decode()
        conn.request("GET", "/typing-extensions/typing_extensions-4.16.0-py3-none-any.whl")
        body = conn.getresponse().read()
        conn.close()
    assert 'href="typing_extensions-4.16.0-py3-none-any.whl"' in listing
    assert body == b"wheel bytes"
