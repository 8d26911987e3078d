"""The classification extension: an output answered as its top-k classes instead of scores.

A requested output with ``parameters["classification"].int64_param = k`` comes back as a
BYTES tensor of shape [batch, min(k, classes)] whose elements read ``"value:index:label"``,
best first, as Triton answers: the value printed as C++ ``std::to_string`` prints it (six
decimals for floating point, plain digits for integers), the index of the class within the
batch item's flattened scores, and the label when the model has one for that index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classify(scores: np.ndarray[Any, Any], class_count: int,
             labels: Sequence[str]) -> np.ndarray[Any, Any]:
    """Top-``class_count`` classes of each batch item of ``scores`` (shape [batch, ...]).

    Ties keep the lower class index first. Returns an object array of bytes, shape
    [batch, min(class_count, classes per item)]. Raises ValueError if ``class_count`` < 1.
    """
    if class_count < 1:
        raise ValueError(f"class_count must be >= 1, got {class_count}")
    batch = scores.shape[0]
    items = scores.reshape(batch, -1)
    keep = min(class_count, items.shape[1])
    as_float = np.issubdtype(items.dtype, np.floating)
    # float64 orders every supported integer exactly up to 2**53, far past any class score.
    order = np.argsort(-items.astype(np.float64), axis=1, kind="stable")[:, :keep]
    result = np.empty((batch, keep), dtype=object)
    for row in range(batch):
        for col, index in enumerate(order[row]):
            value = items[row, index]
            text = f"{float(value):f}" if as_float else str(int(value))
            text += f":{int(index)}"
            if index < len(labels):
                text += f":{labels[index]}"
            result[row, col] = text.encode("utf-8")
    return result
