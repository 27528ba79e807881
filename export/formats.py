"""Writing and loading each deployable format. Loaders return a runner: float32 NCHW array in, log-probs out."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "log_probs"
DEFAULT_OPSET = 18  # the lowest opset the torch.export-based ONNX exporter emits; ONNX Runtime >= 1.14 runs it

FILES = {
    "torchscript": "convnet.torchscript.pt",
    "onnx": "convnet.onnx",
    "pt2": "convnet.pt2",
    "onnx-int8": "convnet.int8.onnx",
}
FLOAT_FORMATS = ("torchscript", "onnx", "pt2")

Runner = Callable[[np.ndarray], np.ndarray]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Export in eval mode (dropout off) and hand the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def torchscript_deprecation_silenced():
    # PyTorch deprecates TorchScript in favour of torch.export, and says so on every trace and load. We ship
    # TorchScript on purpose (the service's CUDA runtime and older deployments need it) and also ship the
    # torch.export program, so the notice is filtered here, by its message, rather than shown to users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=65536)


def export_torchscript(model: torch.nn.Module, path: Path) -> Path:
    with eval_mode(model), torch.no_grad(), torchscript_deprecation_silenced():
        traced = torch.jit.trace(model, model.example_input_array)
        traced.save(str(path))
    return path


def export_pt2(model: torch.nn.Module, path: Path) -> Path:
    with eval_mode(model):
        program = torch.export.export(model, (model.example_input_array,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, path)
    return path


def export_onnx(model: torch.nn.Module, path: Path, opset: int = DEFAULT_OPSET, output_name: str = OUTPUT_NAME) -> Path:
    """``model`` (with its ``example_input_array``) as one ONNX file, batch axis dynamic, checked by onnx."""
    import onnx

    # The example batch is 2, not 1: traced with a batch of 1 the batch axis is fixed even when declared dynamic.
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's chatter (its own deprecations, not ours to fix)
        program = torch.onnx.export(
            model,
            (model.example_input_array,),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_shapes=({0: _batch_dim()},),
            verbose=False,
        )
    program.save(str(path))
    proto = onnx.load(str(path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_runner(fmt: str, path: Path) -> tuple[Runner, list[str]]:
    """A runner for ``fmt`` and the names of its outputs (for ONNX, as declared in the graph)."""
    if fmt in ("onnx", "onnx-int8"):
        session = onnx_session(path)
        names = [o.name for o in session.get_outputs()]
        return (lambda x: session.run(None, {INPUT_NAME: x})[0]), names
    if fmt == "torchscript":
        with torchscript_deprecation_silenced():
            module = torch.jit.load(str(path), map_location="cpu").eval()
    elif fmt == "pt2":
        module = torch.export.load(path).module()
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FILES)}")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{fmt} returned {type(out).__name__}, not one tensor")
        return out.numpy()

    return run, [OUTPUT_NAME]
