"""Where a model runs: the one ``Device`` type of model.json, the server's flags and settings."""

from __future__ import annotations

from typing import Literal, get_args

#: ``cpu``: ONNX Runtime's CPU provider; ``cuda``: the CUDA provider, an error where it is
#: missing; ``auto``: CUDA where the installed onnxruntime has it, else the CPU.
Device = Literal["cpu", "cuda", "auto"]

DEVICES: tuple[str, ...] = get_args(Device)


def parse_device(value: str) -> Device:
    """``value`` as a :data:`Device`; raises :class:`ValueError` naming the allowed values."""
    for device in get_args(Device):
        if value == device:
            return device  # type: ignore[no-any-return]
    raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {value!r}")
