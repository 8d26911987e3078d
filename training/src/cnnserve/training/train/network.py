"""Build a PyTorch network from a parsed architecture spec, checking every shape first.

Feature-map sizes follow ``(W - F + 2P)/S + 1`` per axis (W input size, F kernel, P
padding, S stride). :func:`infer_shapes` computes them for any input size and channel count
and rejects a spec that does not fit before any weights exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnserve.training.train.spec import InputLayer, Layer, SpecError


@dataclass(frozen=True)
class LayerShape:
    """A layer and the shape of its output (``(C, H, W)`` before flattening, ``(N,)`` after)."""

    layer: str
    shape: tuple[int, ...]

    @property
    def text(self) -> str:
        """The shape as ``CxHxW`` or ``N``."""
        return "x".join(str(d) for d in self.shape)


def _window(size: int, k: int, stride: int, pad: int) -> tuple[int, int, str]:
    """Along one axis: output size (floored), input pixels the windows never reach, and the
    filled-in formula. A fractional result only matters when the remainder reaches past the
    trailing padding into real pixels."""
    num = size - k + 2 * pad
    out = num // stride + 1
    skipped = max(0, num % stride - pad)
    value = f"{out}" if num % stride == 0 else f"{num / stride + 1:g}"
    return out, skipped, f"({size} - {k} + 2*{pad})/{stride} + 1 = {value}"


def _table(rows: list[LayerShape], mark: int | None = None) -> str:
    width = max(len(r.layer) for r in rows)
    lines = [f"  {i:>2}  {r.layer:<{width}}  {r.text}" + ("   <-- here" if i == mark else "")
             for i, r in enumerate(rows)]
    return "computed sizes (C x H x W):\n" + "\n".join(lines)


def _fail(rows: list[LayerShape], layer: Layer, reason: str) -> SpecError:
    rows = [*rows, LayerShape(str(layer), ())]
    return SpecError(f"layer {len(rows) - 1} '{layer}' {reason}\n{_table(rows, len(rows) - 1)}")


def infer_shapes(layers: list[Layer], input_shape: tuple[int, int, int],
                 num_classes: int) -> list[LayerShape]:
    """Output shape of every layer, starting with the input (row 0).

    Raises :class:`SpecError` with the per-layer sizes when a convolution's size is not a
    whole number, any map shrinks below 1x1, pooling padding exceeds half the window, an
    ``input(CxHxW)`` disagrees with ``input_shape``, or the final fc does not have
    ``num_classes`` outputs.
    """
    shape: tuple[int, ...] = tuple(input_shape)
    rows = [LayerShape("input", shape)]
    for layer in layers:
        if isinstance(layer, InputLayer):
            if layer.shape and layer.shape != tuple(input_shape):
                raise SpecError(f"the spec says {layer} but the images are "
                                f"{'x'.join(map(str, input_shape))} (C x H x W)")
            continue
        if layer.kind in ("conv", "maxpool", "avgpool"):
            shape = _spatial(rows, layer, shape)
        elif layer.kind == "res":
            # Both convolutions are 3x3 with padding 1: only the first one's stride matters.
            conv = Layer("conv", (("out", layer.arg("out")), ("k", 3.0),
                                  ("stride", layer.arg("stride")), ("pad", 1.0)))
            shape = _spatial(rows, conv, shape)
        elif layer.kind == "gap":
            shape = (shape[0],)
        elif layer.kind in ("fc", "flatten"):
            flat = 1
            for d in shape:
                flat *= d
            shape = (layer.int_arg("out"),) if layer.kind == "fc" else (flat,)
        rows.append(LayerShape(str(layer), shape))
    if rows[-1].shape != (num_classes,):
        raise SpecError(f"the final layer '{layers[-1]}' has {rows[-1].text} outputs but the "
                        f"dataset has {num_classes} classes; end the spec with "
                        f"fc({num_classes})")
    return rows


def _spatial(rows: list[LayerShape], layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    c, h, w = shape
    k, stride, pad = layer.int_arg("k"), layer.int_arg("stride"), layer.int_arg("pad")
    is_conv = layer.kind == "conv"
    if not is_conv and 2 * pad > k:
        raise _fail(rows, layer, f"has padding {pad} larger than half its window {k}")
    out_h, skip_h, f_h = _window(h, k, stride, pad)
    out_w, skip_w, f_w = _window(w, k, stride, pad)
    for size, skipped, formula, axis in ((out_h, skip_h, f_h, "height"),
                                         (out_w, skip_w, f_w, "width")):
        if size < 1:
            raise _fail(rows, layer, f"shrinks the feature map below 1x1: {axis} {formula}")
        if is_conv and skipped:
            raise _fail(rows, layer, f"gives a {axis} that is not a whole number: {formula}, "
                                     f"so its windows never reach the last {skipped} px; "
                                     "change the padding or stride")
    return (layer.int_arg("out") if is_conv else c), out_h, out_w


def build_network(layers: list[Layer], input_shape: tuple[int, int, int],
                  num_classes: int) -> nn.Sequential:
    """The network for ``layers`` on ``input_shape`` images; it outputs ``num_classes`` logits.

    A flatten is inserted before the first fc. Raises :class:`SpecError` (see
    :func:`infer_shapes`) when the spec does not fit the input.
    """
    rows = infer_shapes(layers, input_shape, num_classes)
    modules: list[nn.Module] = []
    shape: tuple[int, ...] = rows[0].shape
    for layer, row in zip((x for x in layers if not isinstance(x, InputLayer)), rows[1:],
                          strict=True):
        if layer.kind == "fc" and len(shape) == 3:
            modules.append(nn.Flatten())
            shape = (shape[0] * shape[1] * shape[2],)
        modules.append(_module(layer, shape))
        shape = row.shape
    return nn.Sequential(*modules)


class ResidualBlock(nn.Module):
    """The basic block of He et al.: two 3x3 conv+bn, the input added before the last relu.

    The shortcut is the identity when shapes match, else a strided 1x1 conv + bn projection.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = torch.relu(out + self.shortcut(x))
        return result


def _module(layer: Layer, in_shape: tuple[int, ...]) -> nn.Module:
    kind = layer.kind
    if kind == "res":
        return ResidualBlock(in_shape[0], layer.int_arg("out"), layer.int_arg("stride"))
    if kind == "gap":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if kind == "conv":
        return nn.Conv2d(in_shape[0], layer.int_arg("out"), layer.int_arg("k"),
                         stride=layer.int_arg("stride"), padding=layer.int_arg("pad"))
    if kind in ("maxpool", "avgpool"):
        pool = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
        return pool(layer.int_arg("k"), stride=layer.int_arg("stride"),
                    padding=layer.int_arg("pad"))
    if kind == "fc":
        return nn.Linear(in_shape[0], layer.int_arg("out"))
    if kind == "bn":
        return nn.BatchNorm2d(in_shape[0]) if len(in_shape) == 3 else nn.BatchNorm1d(in_shape[0])
    if kind == "dropout":
        return nn.Dropout(layer.arg("p"))
    simple: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh,
                                          "sigmoid": nn.Sigmoid, "flatten": nn.Flatten}
    return simple[kind]()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
