"""Check that an exported ONNX model computes what the PyTorch model computes.

Export runs these checks before anything reaches the repository: the ONNX model is run in
ONNX Runtime on real test images at several batch sizes and compared with PyTorch, output by
output. FP32 exports must match to a tolerance with identical argmax; reduced-precision
exports (fp16, int8) are judged by test accuracy against the FP32 model instead, and their
argmax agreement is reported. Only numpy, onnxruntime and torch are needed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from cnnserve.common.names import INPUT, LOGITS, PROBABILITIES

Array = npt.NDArray[np.float32]
#: A model's input images: normalised float32, or UINT8 pixels for a pixel-input graph.
Images = npt.NDArray[np.float32] | npt.NDArray[np.uint8]

#: Output names of every exported model, in graph order.


@dataclass(frozen=True)
class Outputs:
    """Logits and softmax probabilities for N images, float32 ``[N, classes]`` each."""

    logits: Array
    probabilities: Array


@dataclass(frozen=True)
class BatchParity:
    """ONNX Runtime vs PyTorch for every parity image, run at one batch size."""

    batch_size: int
    images: int
    #: Largest absolute difference of any logit / probability (unitless).
    max_abs_diff_logits: float
    max_abs_diff_probabilities: float
    #: Images whose ONNX argmax differs from PyTorch's.
    argmax_mismatches: int


@dataclass(frozen=True)
class ParityReport:
    """The parity figures of one exported graph against the PyTorch model."""

    precision: str
    provider: str
    #: Largest allowed max-abs-diff of logits and probabilities; None: not judged by it (int8).
    tolerance: float | None
    rows: tuple[BatchParity, ...]
    #: What the graph was compared with.
    reference: str = "PyTorch"

    @property
    def max_abs_diff(self) -> float:
        """Worst logit difference over all batch sizes."""
        return max((r.max_abs_diff_logits for r in self.rows), default=0.0)

    @property
    def argmax_mismatches(self) -> int:
        """Worst argmax mismatch count over all batch sizes."""
        return max((r.argmax_mismatches for r in self.rows), default=0)

    @property
    def images(self) -> int:
        """Parity images compared at each batch size."""
        return max((r.images for r in self.rows), default=0)

    def failures(self, *, exact_argmax: bool) -> list[str]:
        """Human-readable reasons the check failed; empty when it passed."""
        out = []
        for r in self.rows:
            worst = max(r.max_abs_diff_logits, r.max_abs_diff_probabilities)
            if self.tolerance is not None and not worst <= self.tolerance:  # NaN fails too
                out.append(f"batch size {r.batch_size}: max abs diff {worst:.3g} exceeds the "
                           f"tolerance {self.tolerance:.3g}")
            if exact_argmax and r.argmax_mismatches:
                out.append(f"batch size {r.batch_size}: argmax differs from PyTorch on "
                           f"{r.argmax_mismatches} of {r.images} images")
        return out

    def to_dict(self) -> dict[str, object]:
        """JSON-ready figures for config.json's metrics."""
        return {"precision": self.precision, "provider": self.provider,
                "reference": self.reference,
                "tolerance": self.tolerance, "images": self.images,
                "max_abs_diff": self.max_abs_diff, "argmax_mismatches": self.argmax_mismatches,
                "batches": [asdict(r) for r in self.rows]}

    def format_table(self) -> str:
        """A fixed-width table, one row per batch size."""
        tol = "none" if self.tolerance is None else f"{self.tolerance:.1e}"
        head = (f"parity {self.precision} ({self.provider}) vs {self.reference}, tolerance "
                f"{tol}\n"
                "  batch  images  max|dlogits|  max|dprobs|  argmax diff")
        lines = [f"  {r.batch_size:5d}  {r.images:6d}  {r.max_abs_diff_logits:11.3e}  "
                 f"{r.max_abs_diff_probabilities:11.3e}  {r.argmax_mismatches:11d}"
                 for r in self.rows]
        return "\n".join([head, *lines])


def parity_batch_sizes(images: int, max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes to verify: 1, 7, 64 and the largest allowed, capped at ``images``."""
    wanted = (1, 7, 64, max_batch_size)
    return tuple(sorted({min(b, max_batch_size, images) for b in wanted if images > 0}))


@torch.inference_mode()
def torch_outputs(model: torch.nn.Module, images: Array, batch_size: int = 256) -> Outputs:
    """Run ``model`` (eval mode, float32 NCHW) over ``images`` in batches."""
    logits = [model(torch.from_numpy(images[i:i + batch_size])).float()
              for i in range(0, len(images), batch_size)]
    all_logits = torch.cat(logits)
    return Outputs(logits=all_logits.numpy(),
                   probabilities=torch.softmax(all_logits, dim=1).numpy())


def open_session(path: str, providers: Sequence[str] = ("CPUExecutionProvider",)
                 ) -> ort.InferenceSession:
    """An ONNX Runtime session on ``path``; raises what ONNX Runtime raises if it cannot load."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs on CPU log a warning per cast
    return ort.InferenceSession(path, sess_options=options, providers=list(providers))


def session_outputs(session: ort.InferenceSession, images: Images, batch_size: int) -> Outputs:
    """Run ``session`` over ``images`` in batches of ``batch_size`` (last one may be short)."""
    logits, probs = [], []
    for i in range(0, len(images), batch_size):
        out = session.run([LOGITS, PROBABILITIES], {INPUT: images[i:i + batch_size]})
        logits.append(np.asarray(out[0], dtype=np.float32))
        probs.append(np.asarray(out[1], dtype=np.float32))
    return Outputs(logits=np.concatenate(logits), probabilities=np.concatenate(probs))


def compare(reference: Outputs, session: ort.InferenceSession, images: Images,
            batch_sizes: Sequence[int], *, precision: str, tolerance: float | None
            ) -> ParityReport:
    """Run ``session`` at each batch size and compare with ``reference`` (PyTorch's outputs)."""
    rows = []
    want = reference.logits.argmax(axis=1)
    for b in batch_sizes:
        got = session_outputs(session, images, b)
        rows.append(BatchParity(
            batch_size=b, images=len(images),
            max_abs_diff_logits=_max_abs_diff(got.logits, reference.logits),
            max_abs_diff_probabilities=_max_abs_diff(got.probabilities, reference.probabilities),
            argmax_mismatches=int((got.logits.argmax(axis=1) != want).sum())))
    return ParityReport(precision=precision, provider=session.get_providers()[0],
                        tolerance=tolerance, rows=tuple(rows))


def _max_abs_diff(a: Array, b: Array) -> float:
    if a.shape != b.shape:
        raise ValueError(f"output shape {list(a.shape)} differs from PyTorch's {list(b.shape)}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    # NaN anywhere must not hide behind max(): report it as NaN so the check fails.
    return float("nan") if np.isnan(diff).any() else float(diff.max(initial=0.0))


def accuracy(session: ort.InferenceSession, images: Array, labels: npt.NDArray[np.int64],
             batch_size: int = 256) -> float:
    """Top-1 accuracy of ``session`` on ``images``, in percent (0..100)."""
    if len(images) == 0:
        return float("nan")
    pred = session_outputs(session, images, batch_size).logits.argmax(axis=1)
    return float((pred == labels).mean() * 100.0)


def throughput(session: ort.InferenceSession, images: Array, batch_size: int,
               min_seconds: float = 1.0) -> float:
    """Images per second of ``session`` at a fixed batch size, on the wall clock.

    One warm-up run, then whole batches until ``min_seconds`` have passed (at least 3 runs).
    """
    batch = images[:batch_size]
    if len(batch) < batch_size:  # too few test images: tile them to the requested size
        batch = np.resize(images, (batch_size, *images.shape[1:])).astype(np.float32)
    feed = {INPUT: batch}
    session.run([LOGITS], feed)
    runs = 0
    start = time.perf_counter()
    while runs < 3 or time.perf_counter() - start < min_seconds:
        session.run([LOGITS], feed)
        runs += 1
    return runs * batch_size / (time.perf_counter() - start)
