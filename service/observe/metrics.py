"""The service's own Prometheus metrics, beside BentoML's on ``/metrics``.

Every label takes values from a small fixed set (endpoint names, status codes, reasons): a client cannot add
series by sending odd paths. Created once per process, after BentoML has set up its multiprocess registry, so
that the workers' values are summed on ``/metrics``.
"""

from __future__ import annotations

import collections
import functools

ENDPOINTS = ("predict", "predict_array", "model_info", "feedback", "health", "v2", "ui", "bentoml", "unknown")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
GOLDEN_DIFF_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)  # the export's tolerance is 1e-5 + 1e-4 x |value|
DIGITS = tuple(str(d) for d in range(10))


class Metrics:
    def __init__(self, client, max_batch_size: int, worker: int = 0):
        self.worker = str(worker)  # 1..workers: how evenly the HTTP workers share the load
        self.requests = client.Counter(
            name="mnist_http_requests_total",
            documentation="HTTP requests answered by the service's own routes, by endpoint, status and HTTP "
            "worker (1..workers; 0 outside `bentoml serve`)",
            labelnames=["endpoint", "status", "worker"],
        )
        self.latency = client.Histogram(
            name="mnist_http_request_duration_seconds",
            documentation="Time from a request's headers to its answer, by endpoint",
            labelnames=["endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.rejected = client.Counter(
            name="mnist_rejected_total",
            documentation="Requests refused, by reason (a fixed set: see service/errors.py)",
            labelnames=["reason"],
        )
        buckets = [2**i for i in range(max_batch_size.bit_length() + 1)]
        self.batch_images = client.Histogram(
            name="mnist_model_batch_images",
            documentation="Images per model call (the batcher's batch sizes)",
            buckets=buckets,
        )
        self.batch_seconds = client.Histogram(
            name="mnist_batch_seconds",
            documentation="Time a batch spent in a work process: decoding, preprocessing and the model call",
            buckets=LATENCY_BUCKETS,
        )
        self.decoded = client.Counter(
            name="mnist_images_decoded_total",
            documentation="Image files the work processes decoded (a request over its budget decodes none)",
        )
        self.abandoned = client.Counter(
            name="mnist_requests_abandoned_total",
            documentation="Queued requests dropped before they ran, because their clients had closed the connection",
        )
        # what the model is being asked and how sure it is: a shift in the digit mix or a fall in confidence is
        # how an operator sees that the inputs changed
        self.predictions = client.Counter(
            name="mnist_predictions_total",
            documentation="Images answered, by the digit predicted (every predict path, the v2 models included)",
            labelnames=["digit"],
        )
        self.confidence = client.Histogram(
            name="mnist_prediction_confidence",
            documentation="The probability of the predicted digit, one observation per image answered",
            buckets=CONFIDENCE_BUCKETS,
        )
        self.preprocess = client.Histogram(
            name="mnist_preprocess_seconds",
            documentation="Time a request's images spent being decoded and preprocessed in a work process",
            buckets=LATENCY_BUCKETS,
        )
        self.restarts = client.Counter(
            name="mnist_work_process_restarts_total",
            documentation="Work processes restarted after they died or ran past the work timeout",
        )
        self.not_digits = client.Counter(
            name="mnist_not_a_digit_total",
            documentation="Images answered that the not-a-digit detector says do not look like a digit",
        )
        # the golden set re-run through each work process's serving path (MNIST_GOLDEN_CHECK_S)
        self.golden_checks = client.Counter(
            name="mnist_golden_checks_total",
            documentation="Golden-set checks of the work processes, by result (a fail makes the worker unready)",
            labelnames=["result"],
        )
        self.golden_diff = client.Histogram(
            name="mnist_golden_max_difference",
            documentation="The largest log-probability difference from the export's golden outputs, per check",
            buckets=GOLDEN_DIFF_BUCKETS,
        )
        # what users said about the answers (POST /feedback): the online accuracy, by model tag
        self.feedback = client.Counter(
            name="mnist_feedback_total",
            documentation="Labelled answers, by model tag, the label (true_digit), what was answered and whether "
            "it was right; true_digit and answered are 0-9 or not_a_digit",
            labelnames=["model", "true_digit", "answered", "result"],
        )
        self.accuracy = client.Gauge(
            name="mnist_online_accuracy",
            documentation="Accuracy over each model tag's last MNIST_ACCURACY_WINDOW labels, from the feedback store",
            labelnames=["model"],
            multiprocess_mode="livemax",  # every worker reads the same store: one value, not a sum
        )
        self.accuracy_labels = client.Gauge(
            name="mnist_online_accuracy_labels",
            documentation="How many labels mnist_online_accuracy counts (at most the window)",
            labelnames=["model"],
            multiprocess_mode="livemax",
        )
        self.accuracy_window = client.Gauge(
            name="mnist_online_accuracy_window",
            documentation="MNIST_ACCURACY_WINDOW: the labels mnist_online_accuracy counts once it has them all",
            multiprocess_mode="livemax",
        )
        self.accuracy_threshold = client.Gauge(
            name="mnist_online_accuracy_threshold",
            documentation="MNIST_ACCURACY_ALERT_BELOW: the online-accuracy alert fires below it",
            multiprocess_mode="livemax",
        )
        # drift (service/observe/drift.py): each worker's window against the export's reference; on /metrics the
        # largest of the live workers' values, so that one worker's window that drifted is seen
        self.drift_score = client.Gauge(
            name="mnist_drift_score",
            documentation="Jensen-Shannon divergence (bits) of the last MNIST_DRIFT_WINDOW images' histogram from the "
            "export's test-set reference, by quantity; exported once a window is full",
            labelnames=["quantity"],
            multiprocess_mode="livemax",
        )
        self.drift_threshold = client.Gauge(
            name="mnist_drift_threshold",
            documentation="The drift score above which a quantity has drifted, bootstrapped by the export for "
            "MNIST_DRIFT_WINDOW",
            labelnames=["quantity"],
            multiprocess_mode="livemax",
        )
        self._children: dict[tuple, object] = {}  # (metric, label values) -> its series, made on first use

    def _child(self, metric, *labels):
        """``metric.labels(*labels)``, looked up once per series: the client takes a lock and builds a key per call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self._child(self.requests, endpoint, str(status), self.worker).inc()
        self._child(self.latency, endpoint).observe(seconds)

    def observe_rejected(self, reason: str) -> None:
        self._child(self.rejected, reason).inc()

    def observe_answer(
        self, digits: list[int], confidences: list[float], prepare_s: float | None = None, not_digits: int = 0
    ) -> None:
        """One request's answers: its digits and confidences, how many of its images did not look like a digit,
        and its preprocessing time (image inputs)."""
        if not_digits:
            self.not_digits.inc(not_digits)
        counts = {digits[0]: 1} if len(digits) == 1 else collections.Counter(digits)
        for digit, count in counts.items():
            self._child(self.predictions, DIGITS[digit]).inc(count)
        for value in confidences:
            self.confidence.observe(value)
        if prepare_s is not None:
            self.preprocess.observe(prepare_s)

    def observe_golden(self, result) -> None:
        """One golden-set check of a work process (service/model/golden.py)."""
        self._child(self.golden_checks, "fail" if result.problem else "pass").inc()
        if result.max_diff != float("inf"):
            self.golden_diff.observe(result.max_diff)

    def observe_feedback(self, model: str, label: str, answered: str, correct: bool) -> None:
        """One label stored (model tags are the few the fleet serves; labels and answers a fixed set of 11)."""
        self._child(self.feedback, model, label, answered, "right" if correct else "wrong").inc()

    def set_online_accuracy(self, model: str, correct: int, labels: int) -> None:
        if labels:
            self._child(self.accuracy, model).set(correct / labels)
        self._child(self.accuracy_labels, model).set(labels)

    def set_accuracy_settings(self, window: int, threshold: float) -> None:
        self.accuracy_window.set(window)
        self.accuracy_threshold.set(threshold)

    def observe_drift(self, scores: dict[str, float]) -> None:
        for quantity, score in scores.items():
            self._child(self.drift_score, quantity).set(score)

    def observe_drift_thresholds(self, thresholds: dict[str, float]) -> None:
        for quantity, threshold in thresholds.items():
            self._child(self.drift_threshold, quantity).set(threshold)

    def observe_batch(self, stats, seconds: float) -> None:
        if stats.model_images:
            self.batch_images.observe(stats.model_images)
        self.batch_seconds.observe(seconds)
        self.decoded.inc(stats.decoded_images)


@functools.cache
def metrics(max_batch_size: int) -> Metrics:
    from service.bentoml_glue import metrics_client, worker_index

    return Metrics(metrics_client(), max_batch_size, worker_index())
