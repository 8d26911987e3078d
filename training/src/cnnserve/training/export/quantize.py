"""Reduced-precision copies of an exported FP32 ONNX model: INT8 (static QDQ) and FP16.

Both keep the FP32 model's interface (float32 ``input``, float32 ``logits`` and
``probabilities``), so a client never needs to know the precision a server runs:

* INT8: ONNX Runtime static quantization in QDQ format, per-channel int8 weights and uint8
  activations (the U8S8 combination ONNX Runtime's x86 kernels are fastest at), calibrated with
  min/max ranges on normalised training images. The softmax and the outputs of fully
  connected layers (the logits among them) stay float: quantizing them would round
  probabilities to steps of 1/255 and could turn a clear argmax into a tie.
* FP16: weights and every activation in float16, with a Cast after the input and before each
  output. Meant for CUDA; ONNX Runtime's CPU provider runs it too (it inserts casts to
  float32 around ops it has no float16 kernel for), which is how export verifies it on a
  machine without a GPU. That check covers the graph and the float16 rounding of weights
  and activations between ops, not CUDA's float16 arithmetic inside them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx

from cnnserve.common.errors import CnnserveError
from cnnserve.common.names import INPUT

log = logging.getLogger(__name__)

#: Op types whose outputs stay float in the INT8 graph (the logits come out of Gemm).
_FLOAT_OUTPUT_OPS = ("Gemm", "MatMul")
_FLOAT_OPS = ("Softmax",)


class QuantizationError(CnnserveError):
    """Quantization or precision conversion could not produce a model."""


class _Calibration:
    """Feeds calibration batches to ONNX Runtime's calibrator.

    ONNX Runtime's ``CalibrationDataReader`` accepts any class with ``get_next`` (its
    ``__subclasshook__``), so this need not subclass it.
    """

    def __init__(self, images: npt.NDArray[np.float32], batch_size: int) -> None:
        self._batches: Iterator[npt.NDArray[np.float32]] = (
            images[i:i + batch_size] for i in range(0, len(images), batch_size))

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


class _DropAdvice(logging.Filter):
    """Drops ORT's advice to run its pre-processing, logged on the root logger every time.

    Its pre-processing (shape inference + graph optimisation) changed neither accuracy nor
    speed of cnnserve's CNNs, whose graphs the exporter has already optimised.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize_int8(fp32_model: Path, out: Path, calibration: npt.NDArray[np.float32],
                  *, batch_size: int = 64) -> None:
    """Write a static INT8 (QDQ, per-channel) copy of ``fp32_model`` to ``out``.

    ``calibration`` holds normalised float32 ``[N, C, H, W]`` training images (a few hundred
    suffice). Raises :class:`QuantizationError` if there are none or ONNX Runtime fails.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if len(calibration) == 0:
        raise QuantizationError("INT8 calibration needs at least one training image")
    model = onnx.load(str(fp32_model))
    keep_float = [n.name for n in model.graph.node if n.op_type in _FLOAT_OPS]
    advice = _DropAdvice()
    logging.getLogger().addFilter(advice)
    try:
        # ORT calibrates in its own temporary folder, so nothing but ``out`` is written here.
        quantize_static(
            str(fp32_model), str(out), _Calibration(calibration, batch_size),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=keep_float, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"OpTypesToExcludeOutputQuantization": list(_FLOAT_OUTPUT_OPS),
                           "WeightSymmetric": True})
    except Exception as exc:  # ORT raises bare Exception/RuntimeError subclasses
        raise QuantizationError(f"INT8 quantization failed: {exc}") from exc
    finally:
        logging.getLogger().removeFilter(advice)
    log.info("INT8 model calibrated on %d images", len(calibration))


def convert_fp16(fp32_model: Path, out: Path) -> None:
    """Write a float16 copy of ``fp32_model`` to ``out`` with float32 inputs and outputs.

    Raises :class:`QuantizationError` if a weight does not fit in float16 (|w| > 65504) or the
    converted graph is invalid.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(fp32_model))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            peak = float(np.abs(onnx.numpy_helper.to_array(init)).max(initial=0.0))
            if peak > float(np.finfo(np.float16).max):
                raise QuantizationError(f"weight '{init.name}' reaches {peak:.3g}, beyond "
                                        "float16's range; export this model without --fp16")
    try:
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
        # The converter appends its output Casts at the end; ONNX requires topological order.
        wrapped = OnnxModel(half)
        wrapped.topological_sort()
        half = wrapped.model
        onnx.checker.check_model(half, full_check=True)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise QuantizationError(f"FP16 conversion produced an invalid graph: {exc}") from exc
    onnx.save(half, str(out))
