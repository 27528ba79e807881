"""A real PostgreSQL server from Debian's packages (``initdb``, ``pg_ctl``) in a temp directory, on a free port.

As root (CI), the server runs as the ``postgres`` user, which PostgreSQL requires. Where the binaries are
missing the tests that need them skip with the reason, except on CI, where ``make test`` installs them."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One server: ``url`` connects as the superuser ``mnist`` (trust authentication, on 127.0.0.1 only)."""

    def __init__(self):
        initdb, self.pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            reason = "PostgreSQL's initdb and pg_ctl are not installed (Debian: apt-get install postgresql)"
            if os.environ.get("CI", "").lower() in ("true", "1"):
                pytest.fail(reason + ": on CI `make test` installs them", pytrace=False)
            pytest.skip(reason)
        self.root = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql://mnist@127.0.0.1:{self.port}/postgres"
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:
            shutil.chown(self.root, "postgres")
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "mnist", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``immediate``: as after a crash (no shutdown checkpoint), the next start replays the WAL."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
