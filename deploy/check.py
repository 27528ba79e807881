"""`make container-test`: run the image and check it as a user would.

Start to /readyz within a deadline; the book's digit_image.jpg answered with its digit through /predict;
/metrics served; every process in the container non-root; then 16 clients send while `docker stop` runs, and
the stop must finish inside its grace period with no accepted request lost. A request counts as accepted once
its TCP connection is established; only connections refused after the listener has closed may fail. The drain
clients talk to the container's own address, not the published port: docker-proxy accepts connections on a
published port even after the container's listener has closed, which would hide the difference.
"""

from __future__ import annotations

import http.client
import json
import logging
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deploy.container import REPO, ContainerError, docker, image_exists

log = logging.getLogger("deploy")

BOOK_IMAGE = REPO.parent / "shared" / "book" / "digit_image.jpg"


@dataclass(frozen=True)
class CheckConfig:
    image: str = "mnist-classifier:latest"
    digit_image: str = str(BOOK_IMAGE)
    expected_digit: int = 2  # the book's digit_image.jpg is a 2
    ready_timeout_s: float = 30.0
    # docker stop's grace period: the service's drain (MNIST_DRAIN_S, 10 s by default) plus its shutdown
    grace_s: int = 30
    clients: int = 16
    load_before_stop_s: float = 2.0  # steady load before the stop, so requests are in flight when it lands
    request_timeout_s: float = 30.0


@dataclass
class DrainCounts:
    """Outcomes of the requests sent while the container stops."""

    ok: int = 0
    refused: int = 0  # the connection was never established: allowed once the listener has closed
    lost: Counter = field(default_factory=Counter)  # connected, then no complete answer: by exception
    errors: Counter = field(default_factory=Counter)  # connected and answered with a status other than 200

    @property
    def accepted_failed(self) -> int:
        return sum(self.lost.values()) + sum(self.errors.values())


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


class ContainerRun:
    """One container of the image, with its port published on loopback; removed on exit."""

    def __init__(self, image: str):
        self.image = image
        self.name = f"mnist-check-{uuid.uuid4().hex[:8]}"
        self.id = ""

    def __enter__(self) -> ContainerRun:
        self.started = time.monotonic()
        self.id = docker("run", "-d", "--name", self.name, "-p", "127.0.0.1::3000", self.image).stdout.strip()
        try:
            port = docker("port", self.id, "3000/tcp").stdout.split()[0].rsplit(":", 1)[1]
            ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", self.id)
        except ContainerError:
            self.__exit__()
            raise
        self.published = ("127.0.0.1", int(port))  # what a user reaches
        self.direct = (ip.stdout.split()[0], 3000)  # the container's own listener, for the drain clients
        return self

    def __exit__(self, *exc) -> None:
        docker("rm", "-f", self.id, check=False)

    def logs(self, lines: int = 30) -> str:
        result = docker("logs", "--tail", str(lines), self.id, check=False)
        return (result.stdout + result.stderr).strip()


def request(address: tuple[str, int], method: str, path: str, body: bytes = b"", headers=None, timeout=10.0):
    """One request on its own connection: (status, body)."""
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def multipart(field_name: str, filename: str, data: bytes) -> tuple[bytes, dict]:
    boundary = secrets.token_hex(16)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def wait_ready(run: ContainerRun, timeout_s: float) -> float | None:
    """Seconds from `docker run` to the first 200 from /readyz, or None past the deadline."""
    while time.monotonic() - run.started < timeout_s:
        try:
            if request(run.published, "GET", "/readyz", timeout=2)[0] == 200:
                return time.monotonic() - run.started
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    return None


def check_predict(run: ContainerRun, cfg: CheckConfig, upload: tuple[bytes, dict]) -> CheckResult:
    status, body = request(run.published, "POST", "/predict", *upload)
    if status != 200:
        return CheckResult("predict", False, f"HTTP {status}: {body[:200]!r}")
    answer = json.loads(body)[0]
    passed = answer["digit"] == cfg.expected_digit
    detail = f"{Path(cfg.digit_image).name} -> {answer['digit']} (confidence {answer['confidence']:.3f})"
    return CheckResult("predict", passed, detail)


def check_metrics(run: ContainerRun) -> CheckResult:
    status, body = request(run.published, "GET", "/metrics")
    names = {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE ")}
    served = status == 200 and any(name.startswith("bentoml_") for name in names)
    return CheckResult("metrics", served, f"HTTP {status}, {len(names)} metric families")


def check_model_info(run: ContainerRun) -> CheckResult:
    status, body = request(run.published, "POST", "/model_info", b"{}", {"Content-Type": "application/json"})
    if status != 200:
        return CheckResult("model_info", False, f"HTTP {status}")
    info = json.loads(body)
    return CheckResult("model_info", True, f"{info['tag']}, {info['runtime']} on {info['device']}")


def check_non_root(run: ContainerRun) -> CheckResult:
    rows = docker("top", run.id, "-eo", "uid,pid,comm").stdout.strip().splitlines()[1:]
    procs = [row.split(None, 2) for row in rows]
    root = [f"{comm} (pid {pid})" for uid, pid, comm in procs if uid == "0"]
    uids = sorted({uid for uid, _, _ in procs})
    if root:
        return CheckResult("non-root", False, f"running as root: {', '.join(root)}")
    return CheckResult("non-root", True, f"{len(procs)} processes, uid {', '.join(uids)}")


def _client(address, upload, stop: threading.Event, counts: DrainCounts, lock: threading.Lock, timeout: float):
    body, headers = upload
    while not stop.is_set():
        conn = http.client.HTTPConnection(*address, timeout=timeout)
        try:
            conn.connect()
        except OSError:  # refused, or the address is already gone: never accepted
            with lock:
                counts.refused += 1
            conn.close()
            time.sleep(0.05)
            continue
        try:
            conn.request("POST", "/predict", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            outcome = "ok" if response.status == 200 else response.status
        except (OSError, http.client.HTTPException) as exc:
            outcome = type(exc).__name__
        finally:
            conn.close()
        with lock:
            if outcome == "ok":
                counts.ok += 1
            elif isinstance(outcome, str):
                counts.lost[outcome] += 1
            else:
                counts.errors[outcome] += 1


def check_stop_under_load(run: ContainerRun, cfg: CheckConfig, upload) -> tuple[CheckResult, CheckResult]:
    """16 clients on the container's address; `docker stop` after a steady second or two; the clients stop
    sending once it has returned."""
    counts, lock, stop = DrainCounts(), threading.Lock(), threading.Event()
    threads = [
        threading.Thread(target=_client, args=(run.direct, upload, stop, counts, lock, cfg.request_timeout_s))
        for _ in range(cfg.clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(cfg.load_before_stop_s)
    served_before = counts.ok
    started = time.monotonic()
    stopped = docker("stop", "-t", str(cfg.grace_s), run.id, check=False)
    stop_s = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join()
    exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", run.id).stdout.strip()
    in_time = stopped.returncode == 0 and stop_s < cfg.grace_s and exit_code != "137"
    stop_result = CheckResult(
        "docker stop",
        in_time,
        f"exit {stopped.returncode} after {stop_s:.1f} s (grace {cfg.grace_s} s); container exit code {exit_code}",
    )
    errors = ", ".join(f"{n} HTTP {status}" for status, n in sorted(counts.errors.items())) or "no HTTP errors"
    lost = ", ".join(f"{n} {kind}" for kind, n in counts.lost.most_common())
    drain_result = CheckResult(
        "drain",
        counts.accepted_failed == 0,
        f"{cfg.clients} clients: {counts.ok} answered ({served_before} before the stop), "
        f"{sum(counts.lost.values())} accepted and lost{f' ({lost})' if lost else ''}, {errors}, "
        f"{counts.refused} refused after the listener closed",
    )
    return stop_result, drain_result


def run_checks(cfg: CheckConfig) -> list[CheckResult]:
    if not image_exists(cfg.image):
        raise ContainerError(f"image {cfg.image} not found (make container builds it)")
    try:
        data = Path(cfg.digit_image).read_bytes()
    except OSError as exc:
        raise ContainerError(f"cannot read the digit image {cfg.digit_image}: {exc.strerror}") from None
    upload = multipart("images", Path(cfg.digit_image).name, data)
    results = []
    with ContainerRun(cfg.image) as run:
        ready_s = wait_ready(run, cfg.ready_timeout_s)
        if ready_s is None:
            detail = f"no 200 within {cfg.ready_timeout_s:.0f} s; last log lines:\n{run.logs()}"
            return [CheckResult("readyz", False, detail)]
        results.append(CheckResult("readyz", True, f"200 {ready_s:.1f} s after docker run"))
        results.append(check_predict(run, cfg, upload))
        results.append(check_metrics(run))
        results.append(check_model_info(run))
        results.append(check_non_root(run))
        results.extend(check_stop_under_load(run, cfg, upload))
    return results
