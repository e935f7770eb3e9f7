"""Export a protected model (or any honeypotnet model) for other serving engines: ONNX or TorchScript.

The exported graph takes what the bundle's model takes, float RGB in [0,1] of shape (N,3,S,S)
with a dynamic batch axis N (normalisation is inside the graph), and answers softmax
probabilities (N,K) (or raw logits with `probabilities=False`). The honeypot lives in the
weights, so any engine that serves the file serves the protected model; output post-processing
(top-k, rounding, label-only) is the engine's business.

After writing, the file is loaded back with the engine's own runtime (onnxruntime for ONNX,
torch.jit.load for TorchScript) and compared with the torch model on random inputs at several
batch sizes; the largest absolute difference is reported.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .ops import atomic_path

FORMATS = ("onnx", "torchscript")


@dataclass
class ExportReport:
    format: str
    path: str
    image_size: int
    num_classes: int
    input_name: str
    output_name: str
    max_abs_diff: float
    batch_sizes: list[int]
    tolerance: float
    ok: bool
    seconds: float
    runtime: str
    opset: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"exported {self.format} to {self.path}: input '{self.input_name}' float32 [N,3,{self.image_size},{self.image_size}] "
                f"-> '{self.output_name}' float32 [N,{self.num_classes}]\n"
                f"max |{self.runtime} - torch| = {self.max_abs_diff:.3g} over batch sizes {self.batch_sizes} "
                f"({'ok' if self.ok else 'OVER'} tolerance {self.tolerance:g})")


class _Probabilities(nn.Module):
    """model -> softmax over classes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def export_model(model: nn.Module, path: str | os.PathLike, fmt: str, image_size: int, *,
                 probabilities: bool = True, opset: int | None = None, batch_sizes: tuple[int, ...] = (1, 3, 8),
                 tolerance: float = 1e-4, seed: int = 0) -> ExportReport:
    """Write `model` to `path` as ONNX or TorchScript and check it against torch on random inputs."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = (_Probabilities(model) if probabilities else model).eval().cpu()
    out_name = "probabilities" if probabilities else "logits"
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    t0 = time.time()
    notes: list[str] = []
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/deprecation chatter; the numerical check below is what counts
        if fmt == "onnx":
            opset = _export_onnx(net, example, tmp, out_name, opset, notes)
        else:
            with torch.no_grad():
                traced = torch.jit.trace(net, example)
            torch.jit.save(traced, str(tmp))
    diff, runtime = _check(net, path, fmt, image_size, batch_sizes, seed, out_name)
    with torch.no_grad():
        k = int(net(example).shape[1])
    return ExportReport(fmt, str(path), image_size, k, "input", out_name, diff, list(batch_sizes), tolerance,
                        diff <= tolerance, round(time.time() - t0, 2), runtime, opset, notes)


def _export_onnx(net: nn.Module, example: torch.Tensor, out: Path, out_name: str, opset: int | None, notes: list[str]) -> int | None:
    """torch.export-based exporter (dynamic batch); the TorchScript-based one if that fails."""
    import contextlib
    import io

    try:
        import onnx
    except ImportError as e:
        raise RuntimeError("ONNX export needs the 'onnx' package: pip install 'honeypotnet[serve]'") from e
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            prog = torch.onnx.export(net, (example,), None, input_names=["input"], output_names=[out_name],
                                     opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},),
                                     external_data=False)
        prog.save(str(out), external_data=False)
        notes.append("torch.export-based ONNX exporter")
    except Exception as e:  # exporter not installed (onnxscript) or the graph does not export: fall back
        notes.append(f"torch.export-based exporter failed ({type(e).__name__}); used the TorchScript-based one")
        with torch.no_grad():
            torch.onnx.export(net, (example,), str(out), input_names=["input"], output_names=[out_name],
                              opset_version=opset or 17, dynamic_axes={"input": {0: "batch"}, out_name: {0: "batch"}},
                              dynamo=False)
    m = onnx.load(str(out))
    return int(next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)) or None


def _check(net: nn.Module, path: Path, fmt: str, image_size: int, batch_sizes: tuple[int, ...], seed: int,
           out_name: str) -> tuple[float, str]:
    """Largest |exported - torch| over random inputs at each batch size (the batch axis is dynamic)."""
    g = torch.Generator().manual_seed(seed + 1)
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError("checking the ONNX file needs onnxruntime: pip install 'honeypotnet[serve]'") from e
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(sess.run([out_name], {"input": x.numpy()})[0])  # noqa: E731
        runtime = f"onnxruntime {ort.__version__}"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path)).eval()
        run = lambda x: loaded(x)  # noqa: E731
        runtime = "torch.jit.load"
    worst = 0.0
    with torch.no_grad():
        for n in batch_sizes:
            x = torch.rand(n, 3, image_size, image_size, generator=g)
            ref, got = net(x), run(x)
            if got.shape != ref.shape:
                raise RuntimeError(f"exported model answers shape {tuple(got.shape)} for batch {n}, torch {tuple(ref.shape)}")
            worst = max(worst, float((got.float() - ref.float()).abs().max()))
    return worst, runtime
