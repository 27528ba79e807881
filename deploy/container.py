"""`make container`: a bento's image, built with `bentoml containerize` on a host with or without registry access.

The steps: a Docker engine must answer (deploy/docker-up.sh starts one); the bentofile's base image is built here
by deploy/base-image.sh when it is ours and missing (the air-gapped path; another base, e.g. python:3.11-slim, is
pulled by Docker as usual); `bentoml build`; the lock's wheels are downloaded on the host and served to the build
(deploy/wheelhouse.py says why); `bentoml containerize` with the legacy builder, because BuildKit would fetch
the `# syntax` frontend BentoML's Dockerfile names from Docker Hub; the image is tagged <bento name>:<version>
and <bento name>:latest.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deploy import wheelhouse

log = logging.getLogger("deploy")

REPO = Path(__file__).resolve().parent.parent
LOCAL_BASE_IMAGE = "mnist-serving/python:3.11-bookworm"  # deploy/base-image.sh's default tag
UV_VERSION = "0.13.4"  # what BentoML's Dockerfile pip-installs on a base without uv (python:3.11-slim)
# build arguments that point the build's uv and pip at the host's wheel index; deploy/Dockerfile.template declares them
INDEX_BUILD_ARGS = ("UV_INDEX_URL", "PIP_INDEX_URL")
_STEP = re.compile(r"Step \d+/\d+ : (RUN|COPY) .*")


class ContainerError(RuntimeError):
    """A step of the image build failed; the message is one line for the user."""


@dataclass(frozen=True)
class ContainerConfig:
    bentofile: str = "bentofile.yaml"
    base_image: str | None = None  # None: the bentofile's docker.base_image
    work_dir: str = "build"  # downloaded wheels, BentoML's temporary build context, the build log


@dataclass(frozen=True)
class BuiltImage:
    bento: str
    base_image: str
    tags: tuple[str, ...]
    size_bytes: int
    seconds: float  # `bentoml containerize` alone
    log_file: Path = field(repr=False)


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(["docker", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise ContainerError("the docker command is not installed (deploy/docker-up.sh installs it)") from None
    if check and result.returncode != 0:
        problem = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ContainerError(f"docker {args[0]} failed: {problem}")
    return result


def require_docker() -> None:
    if docker("info", check=False).returncode != 0:
        raise ContainerError("no Docker engine answers (deploy/docker-up.sh installs and starts one)")
    host = os.environ.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        # the build reaches the wheel index on this host's loopback through --network host
        raise ContainerError(f"DOCKER_HOST={host}: the build needs a Docker engine on this host")


def image_exists(image: str) -> bool:
    return docker("image", "inspect", image, check=False).returncode == 0


def read_bentofile(path: Path) -> dict:
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ContainerError(f"{path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ContainerError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(spec, dict) or "name" not in spec or not (spec.get("docker") or {}).get("base_image"):
        raise ContainerError(f"{path} needs a name and a docker.base_image")
    return spec


def bentofile_for(cfg: ContainerConfig, work: Path) -> tuple[Path, str]:
    """The bentofile to build and its base image: the given one, or a copy with another base image."""
    path = (REPO / cfg.bentofile).resolve()
    spec = read_bentofile(path)
    if cfg.base_image is None or cfg.base_image == spec["docker"]["base_image"]:
        return path, spec["docker"]["base_image"]
    spec["docker"]["base_image"] = cfg.base_image
    variant = work / f"{path.stem}.{re.sub(r'[^A-Za-z0-9.]+', '-', cfg.base_image)}.yaml"
    variant.write_text(yaml.safe_dump(spec, sort_keys=False))
    return variant, cfg.base_image


def ensure_base_image(image: str) -> None:
    if image_exists(image):
        return
    if image != LOCAL_BASE_IMAGE:
        log.info("base image %s is not here; docker build will pull it", image)
        return
    log.info("building the base image %s with deploy/base-image.sh", image)
    env = {**os.environ, "PYTHON": sys.executable}
    if subprocess.run([str(REPO / "deploy" / "base-image.sh"), image], env=env).returncode != 0:
        raise ContainerError(f"deploy/base-image.sh could not build {image}")


def bentoml(*args: str, cwd: Path = REPO, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "bentoml", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        problem = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ContainerError(f"bentoml {args[0]} failed: {problem}")
    return result.stdout


def build_bento(bentofile: Path) -> tuple[str, Path]:
    out = bentoml("build", "-f", str(bentofile), "--output", "tag", str(REPO))
    match = re.search(r"__tag__:(\S+)", out)
    if match is None:
        raise ContainerError("bentoml build printed no tag")
    tag = match.group(1)
    return tag, Path(bentoml("get", tag, "-o", "path").strip())


def lock_file(bento_path: Path) -> Path:
    """BentoML's pinned requirements: requirements.lock.txt on the v1 image path, requirements.txt on v2."""
    for name in ("requirements.lock.txt", "requirements.txt"):
        if (bento_path / "env" / "python" / name).exists():
            return bento_path / "env" / "python" / name
    raise ContainerError(f"the bento at {bento_path} has no locked requirements")


def containerize(bento: str, tags: tuple[str, ...], index_url: str, work: Path) -> Path:
    """`bentoml containerize` with the legacy builder, the wheels' index as build arguments (the Dockerfile
    template declares them), one progress line per Dockerfile step, and the whole output in a log file."""
    # BentoML 1.4.40 resolves a bento's dockerfile_template under its temporary build context and refuses it when
    # that is outside the working directory (bentoml/BentoML#5566): keep the temporary folder under it.
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DOCKER_BUILDKIT": "0", "TMPDIR": str(tmp)}
    args = ["containerize", bento, "--opt", "network=host", "--opt", "force-rm"]
    for name in INDEX_BUILD_ARGS:
        args += ["--opt", f"build-arg={name}={index_url}"]
    for tag in tags:
        args += ["--image-tag", tag]
    log_file = work / f"containerize-{bento.replace(':', '-')}.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            out.write(line)
            if (step := _STEP.search(line)) is not None:
                log.info("  %s", step.group(0)[:110])
        proc.wait()
    # BentoML logs a failed docker build and may still exit 0: the image is the proof
    if proc.returncode != 0 or not image_exists(tags[0]):
        raise ContainerError(f"bentoml containerize {bento} failed; the build log is {log_file}")
    return log_file


def build_image(cfg: ContainerConfig) -> BuiltImage:
    work = (REPO / cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    require_docker()
    bentofile, base = bentofile_for(cfg, work)
    ensure_base_image(base)
    log.info("bentoml build -f %s", bentofile.relative_to(REPO) if bentofile.is_relative_to(REPO) else bentofile)
    bento, bento_path = build_bento(bentofile)
    index = wheelhouse.download(lock_file(bento_path), work / "wheels", extra=[f"uv=={UV_VERSION}"])
    name, version = bento.split(":")
    tags = (f"{name}:{version}", f"{name}:latest")
    log.info("bentoml containerize %s on %s", bento, base)
    started = time.monotonic()
    with wheelhouse.serve(index) as url:
        log_file = containerize(bento, tags, url, work)
    seconds = time.monotonic() - started
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tags[0]).stdout.strip())
    return BuiltImage(bento, base, tags, size, seconds, log_file)
