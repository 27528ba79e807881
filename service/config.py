"""Every setting of the service in one place, read once from the environment.

Each field names its environment variable and says why it has its default; a limit also names the status
a request gets for crossing it. The README's settings table is tested against this module
(``tests/service/test_config.py``), so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

RUNTIMES = ("onnx", "torchscript")
MiB = 1024 * 1024
MAX_SECONDS = 1e6


class ConfigError(ValueError):
    """A setting from the environment has a value the service cannot use."""


def setting(
    env: str,
    default,
    why: str,
    status: int | None = None,
    minimum: float = 1,
    choices: tuple = (),
    secret=False,
    maximum: float | None = None,
    guard=False,
):
    """A dataclass field read from ``env``; ``status`` is what a request gets for crossing it (limits only). A
    secret or a ``guard`` set to blanks is an error: left unset, it turns a check off."""
    meta = {"env": env, "why": why, "status": status, "minimum": minimum, "choices": choices, "secret": secret}
    meta["maximum"], meta["guard"] = maximum, guard or secret
    return field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class ServiceConfig:
    """Defaults tuned on this project's 2-core machine (numbers in docs/performance.md)."""

    # ---- the model ----
    model_tag: str = setting("MNIST_MODEL_TAG", "mnist-convnet:latest", "the model in the BentoML model store")
    runtime: str = setting(
        "MNIST_RUNTIME", "onnx", "ONNX Runtime needs no torch; torchscript runs on CUDA", choices=RUNTIMES
    )
    public_key: str = setting(
        "MNIST_MODEL_PUBLIC_KEY",
        "",
        "a PEM EC public key file: when set, the model's signature (model.sig) is checked before anything of it "
        "is loaded, and an unsigned, changed or otherwise-signed model stops start-up",
        guard=True,
    )
    # ---- processes ----
    workers: int = setting("MNIST_WORKERS", 2, "HTTP worker processes (BentoML workers), one per core", maximum=256)
    work_procs: int = setting(
        "MNIST_WORK_PROCS",
        1,
        "processes per worker that decode, preprocess and run the model, off the worker's event loop",
        maximum=64,
    )
    express_procs: int = setting(
        "MNIST_EXPRESS_PROCS",
        1,
        "processes per worker kept for small requests while the others run long batches (a 64-megapixel upload, "
        "a 31 MiB JSON body), so that a small request never waits behind them; 0: none",
        minimum=0,
        maximum=64,
    )
    work_batch_scheduling: bool = setting(
        "MNIST_WORK_SCHED_BATCH",
        True,
        "work processes run under Linux's SCHED_BATCH: waking with a batch, they do not preempt the HTTP workers "
        "mid-request, which costs both caches (docs/performance.md); 0: the default policy",
        minimum=0,
    )
    threads_per_worker: int = setting(
        "MNIST_THREADS",
        1,
        "intra-op threads of each model session, so that processes do not oversubscribe cores",
        maximum=256,
    )
    # ---- batching ----
    batching: bool = setting(
        "MNIST_BATCHING", True, "0 runs each request as its own model call (for comparison)", minimum=0
    )
    max_batch_size: int = setting(
        "MNIST_MAX_BATCH_SIZE", 256, "images per model call; a batch takes whatever queued while the model ran"
    )
    max_queue_images: int = setting(
        "MNIST_MAX_QUEUE_IMAGES",
        4096,
        "images admitted per worker and not yet answered; past it, 503 with Retry-After (64 clients sending "
        "64 images each fit)",
        status=503,
    )
    max_queue_s: float = setting(
        "MNIST_MAX_QUEUE_S",
        5.0,
        "the work a worker has queued, in estimated seconds (the pixels its images declare, a fixed cost per image "
        "and a JSON body's bytes, x the CPU time per unit recent batches really took); past it, 503 with a "
        "Retry-After of that estimate, so that after a burst the queue is at most this deep (small requests, "
        "where express processes take them, are bounded by the small work queued)",
        status=503,
    )
    work_timeout_s: float = setting(
        "MNIST_WORK_TIMEOUT_S",
        60.0,
        "a batch still running after this is stuck: its process is restarted and its requests get 503",
        status=503,
    )
    golden_check_s: float = setting(
        "MNIST_GOLDEN_CHECK_S",
        300.0,
        "how often each work process re-runs the export's golden set through its serving path (before it serves, "
        "always); a mismatch makes the worker unready. 0: at start-up only",
        minimum=0,
    )
    # ---- feedback (README "The feedback loop") ----
    feedback: bool = setting(
        "MNIST_FEEDBACK",
        True,
        "each answer is remembered under its X-Request-ID so that POST /feedback can label it; 0: no /feedback",
        minimum=0,
    )
    feedback_db: str = setting(
        "MNIST_FEEDBACK_DB",
        "",
        "the SQLite file of the feedback store (WAL mode); unset: feedback.sqlite3 in $BENTOML_HOME",
    )
    feedback_url: str = setting(
        "MNIST_FEEDBACK_URL",
        "",
        "postgresql://user:password@host/db: the store on PostgreSQL instead, shared by a fleet of pods",
        secret=True,
    )
    feedback_window_s: float = setting(
        "MNIST_FEEDBACK_WINDOW_S",
        3600.0,
        "an answer takes feedback for this long; later, its id is unknown (404) and its row is deleted",
        status=404,
    )
    feedback_images: bool = setting(
        "MNIST_FEEDBACK_IMAGES",
        False,
        "also store the 28x28 image the model saw (never the upload) with each answer and its feedback, for "
        "`python -m training --feedback`; off: no pixels are kept",
        minimum=0,
    )
    feedback_image_rows: int = setting(
        "MNIST_FEEDBACK_IMAGE_ROWS", 100_000, "stored feedback images kept, newest first; older ones are erased"
    )
    feedback_image_days: float = setting(
        "MNIST_FEEDBACK_IMAGE_DAYS", 30.0, "a stored feedback image is erased this many days after its label came"
    )
    accuracy_window: int = setting(
        "MNIST_ACCURACY_WINDOW", 200, "the online accuracy gauge counts each model's last this many labels"
    )
    accuracy_alert_below: float = setting(
        "MNIST_ACCURACY_ALERT_BELOW",
        0.9,
        "the online-accuracy alert's threshold (exported as a gauge for the alert rule)",
        minimum=0,
        maximum=1,
    )
    # ---- per-request limits ----
    max_request_bytes: int = setting(
        "MNIST_MAX_REQUEST_BYTES", 32 * MiB, "request body size, with or without a Content-Length", status=413
    )
    max_images_per_request: int = setting("MNIST_MAX_IMAGES", 64, "images in one request", status=413)
    max_image_bytes: int = setting("MNIST_MAX_IMAGE_BYTES", 10 * MiB, "one encoded image file", status=413)
    max_image_pixels: int = setting(
        "MNIST_MAX_IMAGE_PIXELS", 25_000_000, "one image's width x height, read from its header", status=413
    )
    max_request_pixels: int = setting(
        "MNIST_MAX_REQUEST_PIXELS",
        64_000_000,
        "all images of one request together, read from their headers before any is decoded",
        status=413,
    )
    max_jpeg_scans: int = setting(
        "MNIST_MAX_JPEG_SCANS",
        32,
        "scans of one progressive JPEG: each one re-reads the whole image, and its header does not say how "
        "many follow (libjpeg's own progressive scripts use about 10)",
        status=413,
    )
    # ---- connections and time ----
    body_timeout_s: float = setting(
        "MNIST_BODY_TIMEOUT_S", 15.0, "the whole request body must arrive within this after its headers", status=408
    )
    header_timeout_s: float = setting(
        "MNIST_HEADER_TIMEOUT_S",
        10.0,
        "a connection must send a complete request head within this (slow or idle clients hold a socket)",
        status=408,
    )
    keep_alive_s: float = setting("MNIST_KEEP_ALIVE_S", 5.0, "an idle keep-alive connection is closed after this")
    max_connections: int = setting(
        "MNIST_MAX_CONNECTIONS",
        2048,
        "requests in progress per worker; past it a request gets 503 with Retry-After. Idle sockets do not count: "
        "past twice this many sockets, a new one sheds the one that has waited longest",
        status=503,
    )
    max_inflight_bytes: int = setting(
        "MNIST_MAX_INFLIGHT_BYTES",
        256 * MiB,
        "request bodies held in memory per worker at once; a body that would pass it gets 503 with Retry-After. "
        "Bodies over 64 KiB may fill 7/8 of it: the rest is kept for small ones",
        status=503,
    )
    retry_after_s: int = setting("MNIST_RETRY_AFTER_S", 1, "the Retry-After of every 503")
    refusal_hold_s: float = setting(
        "MNIST_REFUSAL_HOLD_S",
        0.5,
        "an overload 503 is sent after this long: clients that resend at once are paced to one try per connection "
        "per hold instead of spending the cores on refusals (nothing of the request is held meanwhile)",
        minimum=0,
        maximum=60,
    )
    drain_s: float = setting(
        "MNIST_DRAIN_S",
        10.0,
        "after SIGTERM: /readyz answers 503 at once, requests are still served this long, then in-flight "
        "ones finish and the worker exits",
        minimum=0,
    )

    # ---- access ----
    api_token: str = setting(
        "MNIST_API_TOKEN",
        "",
        "when set, the predict endpoints and /model_info need `Authorization: Bearer <token>` (401 otherwise); "
        "health checks stay open",
        status=401,
        secret=True,
    )
    metrics_public: bool = setting(
        "MNIST_METRICS_PUBLIC", True, "0 puts /metrics behind the API token too (when one is set)", minimum=0
    )
    # ---- observability ----
    access_log: bool = setting(
        "MNIST_ACCESS_LOG",
        True,
        "one JSON line per request on the service.access logger: time, method, path, status, duration, bytes, "
        "request id",
        minimum=0,
    )
    drift_window: int = setting(
        "MNIST_DRIFT_WINDOW",
        200,
        "images in each worker's drift window (mnist_drift_score, once it is full); one of the sizes the export "
        "bootstrapped the thresholds for (100, 200, 400): a threshold holds only for its window size. 200 fills "
        "within 500 requests on 2 workers; 0: no drift monitoring",
        minimum=0,
    )

    @classmethod
    def from_env(cls, environ: dict | None = None) -> ServiceConfig:
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"], "")
            if raw.strip():
                values[f.name] = _parse(f, raw.strip())
            elif raw and f.metadata["guard"]:  # set, but to blanks: not "no token" (an open API), "no key" (no check)
                raise ConfigError(f"{f.metadata['env']} is set but blank; unset it, or give it a value")
        config = cls(**values)
        if "workers" not in values:  # one per core, on a machine with fewer cores than the default
            config = dataclasses.replace(config, workers=min(config.workers, os.cpu_count() or 1))
        return config

    def describe(self) -> list[dict]:
        """Each setting with its variable, value, status and reason: for /model_info and the README check."""
        return [
            {"name": f.name, "env": f.metadata["env"], "value": self._shown_value(f), "status": f.metadata["status"]}
            for f in dataclasses.fields(self)
        ]

    def _shown_value(self, f: dataclasses.Field):
        value = getattr(self, f.name)
        return ("set" if value else "") if f.metadata["secret"] else value

    def work_settings(self) -> dict:
        """What a work process needs to rebuild this config (everything but secrets)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["secret"]}


def _parse(f: dataclasses.Field, raw: str):
    env, minimum, choices = f.metadata["env"], f.metadata["minimum"], f.metadata["choices"]
    kind = type(f.default)
    if kind is str:
        value = raw.lower() if choices else raw
        if choices and value not in choices:
            raise ConfigError(f"{env} must be one of {', '.join(choices)}, got {raw!r}")
        return value
    try:
        value = float(raw) if kind is float else int(raw)
    except ValueError:
        raise ConfigError(f"{env} must be a {'number' if kind is float else 'whole number'}, got {raw!r}") from None
    if not math.isfinite(value):  # nan passes every comparison below and breaks every timer that uses it
        raise ConfigError(f"{env} must be a finite number, got {raw!r}")
    if kind is float and value > MAX_SECONDS:  # every float setting is a time; the event loop's timers overflow
        raise ConfigError(f"{env} must be at most {MAX_SECONDS:g} (seconds), got {raw}")
    if f.metadata["maximum"] is not None and value > f.metadata["maximum"]:
        raise ConfigError(f"{env} must be at most {f.metadata['maximum']:g}, got {raw}")
    if value < minimum:
        raise ConfigError(f"{env} must be at least {minimum:g}, got {raw}")
    return bool(value) if kind is bool else value


def _shown(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) and value >= MiB and value % MiB == 0:
        return f"{value // MiB} MiB"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table() -> str:
    """The README's settings table, made from the fields above (tests/service/test_config.py checks the two)."""
    rows = ["| setting | default | past it | why |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(ServiceConfig):
        status = f.metadata["status"] or ""
        default = _shown(f.default) if f.default != "" else "(unset)"
        rows.append(f"| `{f.metadata['env']}` | {default} | {status} | {f.metadata['why']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
