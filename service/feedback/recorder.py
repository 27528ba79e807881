"""The worker's side of the feedback store: it remembers each answer under its request id, takes feedback on
them, and keeps the online-accuracy gauges, all from one thread that owns the store's connection.

Answers are written in batches, at most ``FLUSH_S`` late, in transactions that need not reach the disk: the
request path never waits for the store, and a store that is slow or down costs answers the chance of feedback,
never a prediction. Feedback is committed durably before its 2xx.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from service.feedback.store import AnswerRow, DuplicateFeedback, Feedback, Store, StoreError, UnknownAnswer, open_store

log = logging.getLogger("service.feedback")
FLUSH_S = 0.1  # answers reach the store at most this late (plus a commit)
MAX_PENDING = 100_000  # answers waiting for the store; past it (the store is down) new ones are not remembered
PRUNE_S = 60.0  # how often expired answers and images past retention are removed
ACCURACY_S = 5.0  # how often the online-accuracy gauges are refreshed from the store
RETRY_S = 2.0  # after the store failed, the next try is this much later (PostgreSQL: a new connection)
WARN_S = 60.0  # at most one warning per this long about a failing store


class StoreUnavailable(Exception):
    """The store failed; the message says how (the request gets a 503)."""


class Recorder:
    def __init__(self, where: str, model_tag: str, config, metrics=None):
        self.where, self.model_tag, self.config, self.metrics = where, model_tag, config, metrics
        self.keep_images = config.feedback_images
        self.store: Store | None = None
        self._pending: list[AnswerRow] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._tasks: list[tuple[Callable, concurrent.futures.Future]] = []
        self._labels: list[tuple[tuple[str, int, str], concurrent.futures.Future]] = []
        self._stopping = False
        self._dropped = 0
        self._next = {"prune": 0.0, "accuracy": 0.0, "retry": 0.0, "warn": 0.0}
        try:  # `bentoml serve` opened it once before the workers started (service.py): a failure here is transient
            self.store = open_store(where)
        except StoreError as exc:
            self._failed(exc)
        self._thread = threading.Thread(target=self._run, name="feedback-store", daemon=True)
        self._thread.start()

    # ---- on the event loop ----
    def remember(self, request_id: str, digits, confidences, looks_like_digit, images: np.ndarray | None) -> None:
        """One request's answers, one row per image (its index in the request)."""
        now = time.time()
        pixels = None
        if self.keep_images and images is not None:
            pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
        rows = [
            AnswerRow(request_id, i, self.model_tag, d, looks, c, now, None if pixels is None else pixels[i].tobytes())
            for i, (d, c, looks) in enumerate(zip(digits, confidences, looks_like_digit))
        ]
        with self._lock:
            if len(self._pending) + len(rows) > MAX_PENDING:
                self._dropped += len(rows)
                return
            self._pending.extend(rows)

    async def feedback(self, request_id: str, idx: int, label: str) -> Feedback:
        """Store a label; UnknownAnswer, DuplicateFeedback or StoreUnavailable otherwise. An answer another
        worker gave may still be on its way to the store: an unknown id is looked up once more after that."""
        try:
            return await self._label((request_id, idx, label))
        except UnknownAnswer:
            await asyncio.sleep(3 * FLUSH_S)
            return await self._label((request_id, idx, label))

    async def _label(self, label: tuple[str, int, str]) -> Feedback:
        """Queued with the other labels that arrive meanwhile: the store's thread commits them together."""
        return await self._queued(self._labels, label)

    async def stats(self, since: float, model_tag: str | None) -> dict:
        return await self._call(lambda store: store.stats(since, model_tag))

    async def _call(self, work: Callable):
        return await self._queued(self._tasks, work)

    async def _queued(self, queue: list, item):
        """``item`` onto one of the store thread's queues (labels, other work), and its result when it is done."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping:
                raise StoreUnavailable("the worker is shutting down")
            queue.append((item, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending, then close the connection (the worker is stopping)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- on the store's thread ----
    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            with self._lock:
                tasks, self._tasks = self._tasks, []
                labels, self._labels = self._labels, []
                stopping = self._stopping
            if tasks or labels:
                self._flush()  # an answer this worker just gave is in the store before its feedback is looked up
                if labels:
                    self._store_labels(labels)
                for work, future in tasks:
                    self._answer(work, future)
            self._flush()
            self._periodic(time.monotonic())
            if stopping:
                self._flush()
                if self.store is not None:
                    self.store.close()
                return

    def _answer(self, work: Callable, future: concurrent.futures.Future) -> None:
        store = self._connected()
        if store is None:
            future.set_exception(StoreUnavailable(f"the feedback store is unavailable ({self._last_error})"))
            return
        try:
            future.set_result(work(store))
        except (UnknownAnswer, DuplicateFeedback) as exc:
            future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - any driver's error: the request gets a 503, the store a retry
            self._failed(exc)
            future.set_exception(StoreUnavailable(f"the feedback store failed ({self._last_error})"))

    def _store_labels(self, labels: list) -> None:
        """One durable transaction for every label queued meanwhile: a sync per batch, not per label."""
        since = time.time() - self.config.feedback_window_s
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._answer(lambda store: store.add_feedbacks([label for label, _ in labels], since), future)
        try:
            results = future.result()
        except StoreUnavailable as exc:
            results = [exc] * len(labels)
        for (_, waiting), result in zip(labels, results):
            if isinstance(result, Exception):
                waiting.set_exception(result)
            else:
                waiting.set_result(result)

    def _flush(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, []
            dropped, self._dropped = self._dropped, 0
        if dropped:
            self._warn(f"{dropped} answers were not remembered for feedback: the store is not keeping up")
        if not rows:
            return
        store = self._connected()
        try:
            if store is None:
                raise StoreUnavailable(self._last_error)
            store.record_answers(rows)
        except Exception as exc:  # noqa: BLE001 - kept for the next try, within MAX_PENDING
            if not isinstance(exc, StoreUnavailable):
                self._failed(exc)
            with self._lock:
                room = MAX_PENDING - len(self._pending)
                self._pending[:0] = rows[-room:] if room > 0 else []

    def _periodic(self, now: float) -> None:
        store = self._connected()
        if store is None:
            return
        try:
            if now >= self._next["prune"]:
                self._next["prune"] = now + PRUNE_S
                config = self.config
                store.prune(
                    time.time(), config.feedback_window_s, config.feedback_image_rows, config.feedback_image_days
                )
            if self.metrics is not None and now >= self._next["accuracy"]:
                self._next["accuracy"] = now + ACCURACY_S
                correct, labels = store.recent(self.config.accuracy_window, self.model_tag)
                self.metrics.set_online_accuracy(self.model_tag, correct, labels)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    _last_error = ""

    def _connected(self) -> Store | None:
        """The store, reconnected after a failure once ``RETRY_S`` has passed; None while it is down."""
        if self.store is not None:
            return self.store
        if time.monotonic() < self._next["retry"]:
            return None
        try:
            self.store = open_store(self.where)
            log.info("the feedback store is back")
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
        return self.store

    def _failed(self, exc: Exception) -> None:
        self._last_error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        self._warn(f"the feedback store failed: {self._last_error}")
        if self.store is not None:
            try:
                self.store.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass
        self.store = None
        self._next["retry"] = time.monotonic() + RETRY_S

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now >= self._next["warn"]:
            self._next["warn"] = now + WARN_S
            log.warning("%s", message)
