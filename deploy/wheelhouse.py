"""A bento's locked requirements as wheels downloaded on this host, served to `docker build` as a package index.

Why: RUN steps inside `docker build` cannot verify this host's HTTPS egress (it presents a CA that only the host
trusts), and the host's trust store must not end up in an image. pip on the host downloads the exact pinned
wheels; the build installs them from http://127.0.0.1:<port>/ (it runs on the host's network), and the image
keeps Debian's standard CA bundle. On a host with plain internet access this costs one download and nothing
else changes: the versions are the lock's either way.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

log = logging.getLogger("deploy")

PYTHON_VERSION = "3.11"  # the base image's: Debian bookworm's python3, and python:3.11-slim
# manylinux wheels built for glibc up to bookworm's 2.36 run on both bases
MAX_GLIBC_MINOR = 36


class WheelhouseError(RuntimeError):
    """The wheels for a lock could not be downloaded."""


def platform_tags() -> list[str]:
    """pip's --platform values for x86_64 Linux with glibc <= 2.36. pip 23 does not widen a manylinux tag to
    the older glibc versions it implies, so every one is named."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(MAX_GLIBC_MINOR, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def project_name(wheel: str) -> str:
    """The PEP 503 normalized project name of a wheel file name."""
    return re.sub(r"[-_.]+", "-", wheel.split("-", 1)[0]).lower()


def download(lock: Path, root: Path, extra: Sequence[str] = ()) -> Path:
    """Download every wheel `lock` pins (plus `extra` requirements) for the image's platform into a folder keyed
    by their contents, and lay it out as a PEP 503 index; returns the index folder. Reuses an earlier download."""
    text = lock.read_text() + "".join(f"{req}\n" for req in extra)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    files, index = root / key / "files", root / key / "simple"
    if not (root / key / "complete").exists():
        files.mkdir(parents=True, exist_ok=True)
        requirements = root / key / "requirements.txt"
        requirements.write_text(text)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        cmd += [arg for tag in platform_tags() for arg in ("--platform", tag)]
        cmd += [
            "--python-version",
            PYTHON_VERSION,
            "--implementation",
            "cp",
            "--abi",
            "cp" + PYTHON_VERSION.replace(".", ""),
        ]
        cmd += ["--dest", str(files)]
        cmd += ["--requirement", str(requirements)]
        log.info("downloading the locked wheels into %s", files)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            problem = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise WheelhouseError(f"pip download failed for {lock}: {problem}")
        (root / key / "complete").touch()
    _layout_index(files, index)
    return index


def _layout_index(files: Path, index: Path) -> None:
    for wheel in sorted(files.glob("*.whl")):
        link = index / project_name(wheel.name) / wheel.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(wheel.resolve())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextmanager
def serve(index: Path) -> Iterator[str]:
    """Serve the index folder on loopback for the duration of the block; yields its URL. The port is derived from
    the folder's name where it is free: the URL is a build argument, and Docker's layer cache keys on it."""
    handler = partial(_QuietHandler, directory=str(index))
    preferred = 20000 + int(hashlib.sha256(index.parent.name.encode()).hexdigest(), 16) % 10000
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", preferred), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
