"""INT8 ONNX: static quantization (QDQ, per-channel weights), calibrated on real training images."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from export.formats import INPUT_NAME, onnx_session

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 64


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a normalized float32 array."""

    def __init__(self, x: np.ndarray):
        self._batches = iter(np.array_split(x, max(1, len(x) // CALIBRATION_BATCH)))

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(float_onnx: Path, out: Path, calibration: np.ndarray) -> Path:
    """Write an INT8 QDQ model of ``float_onnx`` to ``out``, calibrated on ``calibration`` (N,1,28,28 float32)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return out


def speedup(float_onnx: Path, int8_onnx: Path, x: np.ndarray, batch: int = 64, repeats: int = 5) -> dict:
    """Images per second of both models in ONNX Runtime on the same inputs; best of ``repeats`` passes."""
    rates = {}
    for name, path in (("float", float_onnx), ("int8", int8_onnx)):
        session = onnx_session(path)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                session.run(None, {INPUT_NAME: x[i : i + batch]})
            best = min(best, time.perf_counter() - t0)
        rates[name] = len(x) / best
    return {
        "batch": batch,
        "float_images_per_s": rates["float"],
        "int8_images_per_s": rates["int8"],
        "speedup": rates["int8"] / rates["float"],
    }
