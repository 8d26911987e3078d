"""Turn a PyTorch classifier into a single-file ONNX graph with a dynamic batch dimension.

The graph takes float32 ``input [batch, C, H, W]`` (already normalised) and returns float32
``logits [batch, classes]`` and ``probabilities [batch, classes]`` (softmax of the logits).

Exporter choice: torch 2.13's ``torch.onnx.export`` defaults to the torch.export-based
("dynamo") exporter; the TorchScript exporter still exists but is deprecated and announced
for removal, so it is only a fallback for a model torch.export cannot trace. The dynamo
exporter natively targets opset 18 and converts down to a lower requested opset; the opset
is checked afterwards so a failed conversion is an error rather than a surprise.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx
import torch

from cnnserve.common.errors import CnnserveError
from cnnserve.common.names import INPUT, OUTPUTS

log = logging.getLogger(__name__)

BATCH_DIM = "batch"
#: Loggers whose progress chatter (opset conversion notes, missing torchvision) is dropped.
_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


class GraphError(CnnserveError):
    """The model could not be exported, or the exported graph is not what serving needs."""


class _Serving(torch.nn.Module):
    """Adds the softmax output so clients can ask for probabilities without computing them."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, int, int],
                opset: int) -> str:
    """Write ``model`` (eval mode) as ONNX to ``path``; return the exporter used.

    The file holds every weight (no external data), the batch dimension is symbolic, and
    the opset is ``opset``. A result that misses any of these (e.g. the dynamo exporter could
    not convert down to ``opset``) counts as a failure of that exporter. Raises
    :class:`GraphError` if neither exporter succeeds or the result fails ``onnx.checker``.
    """
    wrapped = _Serving(model).eval()
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 0 or 1.
    example = torch.zeros(2, *input_shape)
    errors = []
    for exporter in ("dynamo", "torchscript"):
        try:
            with _quiet():
                _run_exporter(wrapped, example, path, opset, dynamo=exporter == "dynamo")
            model_proto = onnx.load(str(path))
            _check_signature(model_proto, opset)
            break
        except Exception as exc:  # the exporters raise many unrelated types
            first = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
            log.warning("the %s ONNX exporter failed: %s", exporter, first)
            errors.append(f"{exporter}: {first}")
    else:
        raise GraphError("ONNX export failed with both exporters:\n  " + "\n  ".join(errors))
    _name_batch_dims(model_proto)
    save(model_proto, path)
    return exporter


def _run_exporter(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                  *, dynamo: bool) -> None:
    if dynamo:
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT],
                          output_names=list(OUTPUTS), opset_version=opset, dynamo=True,
                          external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},))
    else:
        axes = {name: {0: BATCH_DIM} for name in (INPUT, *OUTPUTS)}
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT],
                          output_names=list(OUTPUTS), opset_version=opset, dynamo=False,
                          verbose=False, dynamic_axes=axes)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' warnings and log chatter; real failures still raise."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_signature(model: onnx.ModelProto, opset: int) -> None:
    got = opset_of(model)
    if got != opset:
        raise GraphError(f"the exporter produced opset {got}, not the requested {opset}; "
                         f"try --opset {got}")
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT] or outputs != list(OUTPUTS):
        raise GraphError(f"exported graph has inputs {inputs} and outputs {outputs}; "
                         f"expected [{INPUT!r}] and {list(OUTPUTS)}")
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            raise GraphError(f"exported tensor '{value.name}' has a fixed batch dimension; "
                             "the model must accept any batch size")


def _name_batch_dims(model: onnx.ModelProto) -> None:
    # Exporters name the symbolic dim differently ("batch", "s0", ...); one name reads better.
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain ("ai.onnx") opset version the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise GraphError("the ONNX model imports no default-domain opset")


def stamp_metadata(path: Path, props: Mapping[str, str]) -> None:
    """Set ``metadata_props`` entries of the model at ``path`` (replacing same-named ones)."""
    model = onnx.load(str(path))
    kept = {p.key: p.value for p in model.metadata_props if p.key not in props}
    del model.metadata_props[:]
    for key, value in {**kept, **props}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    save(model, path)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of the model at ``path`` as a dict."""
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def save(model: onnx.ModelProto, path: Path) -> None:
    """Check ``model`` with ``onnx.checker`` (full, with shape inference) and save it as one file.

    Raises :class:`GraphError` if the check fails or the model exceeds protobuf's 2 GiB limit.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path), save_as_external_data=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphError(f"the ONNX graph is invalid: {exc}") from exc
    except ValueError as exc:  # raised by protobuf for models over 2 GiB
        raise GraphError(f"cannot save the ONNX model as a single file: {exc}") from exc
