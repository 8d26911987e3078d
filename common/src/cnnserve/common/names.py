"""The canonical tensor names of a model that ``cnnserve export`` writes.

Training writes them into the ONNX graph and config.json; the client looks for them to find
scores and class probabilities. Third-party models may use any names: nothing on the server
depends on these.
"""

from __future__ import annotations

#: The image batch, ``[-1, C, H, W]``.
INPUT = "input"
#: Unnormalised class scores, ``[-1, classes]``.
LOGITS = "logits"
#: Softmax of the logits, ``[-1, classes]``.
PROBABILITIES = "probabilities"
#: Every output an exported classifier has, in graph order.
OUTPUTS = (LOGITS, PROBABILITIES)
