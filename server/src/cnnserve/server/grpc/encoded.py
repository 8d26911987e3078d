"""Encoded images: PNG/JPEG files sent as a BYTES image input, for models whose model.json
sets ``"encoded_images": true``.

A request whose one input is the model's image input, datatype BYTES, shape ``[N]`` or
``[N, 1]`` (one file per element) is turned here, before validation, into the tensor the model
takes: each file decoded by :func:`cnnserve.common.images.decode_image` (PNG or JPEG only, at
most MAX_IMAGE_PIXELS pixels, converted to the model's channels, resized to its height and
width with the BILINEAR filter) into UINT8 pixels, normalised with the model's statistics for
a float input. Decoding runs on the default thread pool, off the event loop. Requests of any
other shape pass through unchanged and are validated as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnserve.common.datatypes import NUMPY_DTYPES
from cnnserve.server.errors import InvalidRequest, Unsupported
from cnnserve.server.grpc.codec import InputTensor

if TYPE_CHECKING:
    from cnnserve.server.engine.core import LoadedModel

IMAGE_DATATYPES = ("UINT8", "FP32", "FP16")


def is_encoded(model: LoadedModel, inputs: Sequence[InputTensor]) -> bool:
    """Whether ``inputs`` is an encoded-image request this model accepts."""
    if not model.policy.encoded_images or len(inputs) != 1:
        return False
    (spec,) = model.config.inputs
    tensor = inputs[0]
    return (tensor.datatype == "BYTES" and tensor.name == spec.name
            and len(tensor.shape) in (1, 2) and tensor.shape[1:] in ((), (1,)))


async def decode_images(model: LoadedModel, inputs: Sequence[InputTensor]) -> list[InputTensor]:
    """The image input decoded from the files in ``inputs[0]`` (see the module docstring).

    Raises InvalidRequest naming the element for a file that is not a PNG/JPEG image or is too
    large, and Unsupported when Pillow is not installed or the model does not take images.
    """
    (spec,) = model.config.inputs
    if len(spec.shape) != 4 or spec.datatype not in IMAGE_DATATYPES:
        raise Unsupported(f"model '{model.name}' has no [-1, C, H, W] image input to decode "
                          "images into")
    from cnnserve.common import images

    try:
        import PIL  # noqa: F401  (images imports Pillow lazily; find out now)
    except ImportError:
        raise Unsupported("decoding images needs Pillow on the server: install the "
                          "'images' extra (pip install 'cnnserve[serve,images]')") from None
    files = [bytes(item) for item in inputs[0].data.reshape(-1)]
    shape = (spec.shape[1], spec.shape[2], spec.shape[3])

    def decode() -> np.ndarray[Any, Any]:
        pixels = np.empty((len(files), *shape), np.uint8)
        for index, data in enumerate(files):
            try:
                pixels[index] = images.decode_image(data, shape)
            except (images.ImageReadError, images.ImageShapeError) as exc:
                raise InvalidRequest(f"model '{model.name}' input '{spec.name}' element "
                                     f"{index}: {exc}") from None
        return pixels

    pixels = await asyncio.get_running_loop().run_in_executor(None, decode)
    data = pixels if spec.datatype == "UINT8" else _normalised(model, pixels, spec.datatype)
    return [InputTensor(spec.name, spec.datatype, data.shape, data)]


def _normalised(model: LoadedModel, pixels: np.ndarray[Any, Any],
                datatype: str) -> np.ndarray[Any, Any]:
    from cnnserve.common.preprocess import normalize

    norm = model.config.normalization
    channels = pixels.shape[1]
    mean = norm.mean if norm is not None else (0.0,) * channels
    std = norm.std if norm is not None else (1.0,) * channels
    return normalize(pixels, mean, std).astype(NUMPY_DTYPES[datatype])
