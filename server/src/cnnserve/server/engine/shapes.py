"""Adapting requests to a graph whose tensors clients see in another shape.

Two cases, both from Triton's model configuration: a model that does not batch
(max_batch_size 0), whose requests the batcher carries with a virtual batch dimension of
one row, and config.pbtxt's ``reshape``, where the graph takes or produces a tensor in a
different shape than clients send or receive (same elements, same order). Reshapes of
contiguous arrays are views: nothing is copied.
"""

from __future__ import annotations

from collections.abc import Mapping

from cnnserve.common.datatypes import Array
from cnnserve.common.repository import VersionConfig
from cnnserve.server.batching.rows import Runner


class ShapedRunner:
    """A :class:`Runner` that maps served shapes to the graph's and back (thread-safe)."""

    def __init__(self, runner: Runner, served: VersionConfig, graph: VersionConfig) -> None:
        self._runner = runner
        self._batched = served.max_batch_size > 0
        skip = 1 if self._batched else 0
        shapes = {t.name: t.shape for t in (*served.inputs, *served.outputs)}
        # Only tensors with a reshape are reshaped (their shapes hold at most one -1).
        self._inputs = {t.name: t.shape[skip:] for t in graph.inputs
                        if t.shape != shapes[t.name]}
        self._outputs = {t.name: shapes[t.name][skip:] for t in graph.outputs
                         if t.shape != shapes[t.name]}

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Run one batch given in served shapes (unbatched: one row of a virtual batch)."""
        ins, outs = self._inputs, self._outputs
        if self._batched:
            feeds = {k: v.reshape(len(v), *ins[k]) if k in ins else v for k, v in inputs.items()}
            results = self._runner.run(feeds)
            return {k: v.reshape(len(v), *outs[k]) if k in outs else v
                    for k, v in results.items()}
        feeds = {k: v[0].reshape(ins[k]) if k in ins else v[0] for k, v in inputs.items()}
        results = self._runner.run(feeds)
        return {k: (v.reshape(outs[k]) if k in outs else v)[None] for k, v in results.items()}
