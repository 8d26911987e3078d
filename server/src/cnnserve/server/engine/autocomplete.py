"""Completing a version's signature from its ONNX graph, as Triton's auto-complete does.

A version with no cnnserve ``config.json`` is described by its graph, with whatever
``config.pbtxt`` lists on top. The rules (documented in README "The model repository"):

- Every input and output the graph has is served; names, datatypes and shapes come from the
  graph unless config.pbtxt lists them, in which case they must agree with it.
- Batching: with config.pbtxt ``max_batch_size`` > 0 the graph must have a symbolic first
  dimension on every input and output. With no config.pbtxt, or one whose max_batch_size is
  0/absent and that lists no tensor with dims (or only dims that leave out the graph's first
  dimension, Triton's hint), batching is derived: if every input and output has a symbolic
  first dimension the model batches with ``DEFAULT_MAX_BATCH_SIZE`` rows (model.json's
  max_batch_size overrides it), otherwise max_batch_size is 0 and every request runs alone
  with the graph's exact shapes. A config.pbtxt listing full graph shapes and no
  max_batch_size means 0.

The result is two VersionConfigs: what clients see, and what the graph takes (they differ
only where config.pbtxt gives a ``reshape``). Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from cnnserve.common.repository import ConfigError, TensorSpec, VersionConfig
from cnnserve.server.engine.triton_config import TritonModel, TritonTensor
from cnnserve.server.runtime.signature import GraphSignature, GraphTensor

#: max_batch_size of a version whose graph batches and whose files do not say. Triton's
#: onnxruntime backend picks 4; CNN serving gains from larger batches on CPU and GPU alike,
#: and 32 images of 3x224x224 float32 are 19 MB of input, safe for common memory sizes.
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class Completion:
    """A completed signature: ``config`` as served, ``graph`` as the session sees it."""

    config: VersionConfig
    graph: VersionConfig
    notes: tuple[str, ...]
    #: Class labels per output (config.pbtxt's label_filename); empty: config.labels for all.
    output_labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def batching_problem(signature: GraphSignature) -> str:
    """Why the graph cannot batch ("" when every input and output has a symbolic first dim)."""
    for kind, tensors in (("input", signature.inputs), ("output", signature.outputs)):
        for t in tensors:
            if not t.shape:
                return f"{kind} '{t.name}' is a scalar"
            if t.shape[0] != -1:
                return f"{kind} '{t.name}' has a fixed first dimension ({t.shape[0]})"
    return ""


def _first_dim(signature: GraphSignature) -> str:
    names = {t.dim_names[0] for t in (*signature.inputs, *signature.outputs) if t.dim_names}
    named = sorted(n for n in names if n)
    return f"symbolic first dimension {'/'.join(repr(n) for n in named)}" if named \
        else "unnamed dynamic first dimension"


def complete(name: str, signature: GraphSignature, triton: TritonModel | None = None,
             policy_max_batch_size: int | None = None) -> Completion:
    """The signature of a version described by its graph and, if given, config.pbtxt.

    Raises ConfigError naming config.pbtxt and the graph when they disagree, when a listed
    tensor is not in the graph, when the graph cannot batch but config.pbtxt says it does,
    or when a graph tensor has a type the protocol cannot carry.
    """
    notes: list[str] = []
    problem = batching_problem(signature)
    # Tensors listed without dims only name a datatype or labels: they say nothing of batching.
    listed = triton is not None and any(t.dims is not None
                                        for t in (*triton.inputs, *triton.outputs))
    full_shapes = listed and not (not problem and triton is not None
                                  and _dims_omit_batch(triton, signature))
    if triton is not None and triton.max_batch_size > 0:
        if problem:
            raise ConfigError(f"config.pbtxt sets max_batch_size {triton.max_batch_size} but "
                              f"the graph cannot batch: its {problem}; set max_batch_size: 0")
        max_batch = triton.max_batch_size
        notes.append(f"max_batch_size {max_batch}: config.pbtxt")
    elif full_shapes:
        max_batch = 0
        notes.append("max_batch_size 0 (no batching): config.pbtxt lists tensors with the "
                     "graph's full shapes and sets no max_batch_size")
    elif problem:
        max_batch = 0
        notes.append(f"max_batch_size 0 (no batching), derived: the graph's {problem}; "
                     "requests run one at a time with the graph's exact shapes")
        if policy_max_batch_size:
            notes.append(f"model.json's max_batch_size {policy_max_batch_size} is not used: "
                         "the graph cannot batch")
    else:
        max_batch = policy_max_batch_size or DEFAULT_MAX_BATCH_SIZE
        why = "model.json" if policy_max_batch_size else f"default {DEFAULT_MAX_BATCH_SIZE}"
        hint = ", and config.pbtxt's dims leave it out" if listed else ""
        notes.append(f"max_batch_size {max_batch} ({why}), derived: every input and output "
                     f"has a {_first_dim(signature)}{hint}")
    given_in = {t.name: t for t in triton.inputs} if triton else {}
    given_out = {t.name: t for t in triton.outputs} if triton else {}
    ins = [_spec("input", g, given_in.get(g.name), max_batch) for g in signature.inputs]
    outs = [_spec("output", g, given_out.get(g.name), max_batch) for g in signature.outputs]
    for kind, given, tensors in (("input", given_in, signature.inputs),
                                 ("output", given_out, signature.outputs)):
        unknown = sorted(set(given) - {t.name for t in tensors})
        if unknown:
            raise ConfigError(f"config.pbtxt lists {kind}s {unknown} that the graph does not "
                              f"have; the graph's {kind}s are {[t.name for t in tensors]}")
    if triton is not None:
        shown = [t.name for t in (*triton.inputs, *triton.outputs)]
        notes.append(f"tensors {shown} from config.pbtxt, checked against the graph; the "
                     "rest from the graph" if shown else "every tensor from the graph")
    else:
        notes.append("every tensor from the graph")
    layout = _layout(triton)
    labels = {t.name: t.labels for t in given_out.values() if t.labels}
    config = VersionConfig(
        name=name, inputs=tuple(s for s, _ in ins), outputs=tuple(s for s, _ in outs),
        max_batch_size=max_batch, input_layout=layout,
        precision="fp16" if any(s.datatype == "FP16" for s, _ in ins) else "fp32",
        architecture=signature.graph_name,
        labels=next(iter(labels.values())) if len(labels) == 1 else ())
    graph = dataclasses.replace(config, inputs=tuple(g for _, g in ins),
                                outputs=tuple(g for _, g in outs))
    output_labels = ({t.name: labels.get(t.name, ()) for t in config.outputs}
                     if labels else {})
    return Completion(config, graph, tuple(notes), output_labels)


def _dims_omit_batch(triton: TritonModel, signature: GraphSignature) -> bool:
    """Whether config.pbtxt's dims leave out the graph's first dimension (Triton's hint that
    a model with max_batch_size 0/absent batches), for every listed tensor with dims."""
    graph = {t.name: len(t.shape) for t in (*signature.inputs, *signature.outputs)}
    ranks = [(len(t.reshape if t.reshape is not None else t.dims), graph.get(t.name))
             for t in (*triton.inputs, *triton.outputs) if t.dims is not None]
    return bool(ranks) and all(g is not None and r + 1 == g for r, g in ranks)


def _layout(triton: TritonModel | None) -> str:
    layouts = {t.layout for t in triton.inputs} if triton else set()
    return layouts.pop() if len(layouts) == 1 else "NONE"


def _spec(kind: str, graph: GraphTensor, given: TritonTensor | None,
          max_batch: int) -> tuple[TensorSpec, TensorSpec]:
    """(spec as served, spec as the graph takes it) of one tensor."""
    where = f"{kind} '{graph.name}'"
    if not graph.supported:
        raise ConfigError(f"{where} has type {graph.onnx_type} in the graph, which the "
                          "inference protocol cannot carry")
    batch = (-1,) if max_batch else ()
    if given is None or given.dims is None:
        if given is not None and given.datatype not in (None, graph.datatype):
            raise _disagree(where, f"data_type {given.datatype}", f"{graph.datatype}")
        spec = TensorSpec(graph.name, graph.datatype, graph.shape)
        return spec, spec
    if given.datatype not in (None, graph.datatype):
        raise _disagree(where, f"data_type {given.datatype}", graph.datatype)
    served = batch + given.dims
    inner = batch + (given.reshape if given.reshape is not None else given.dims)
    fits = len(inner) == len(graph.shape) and all(
        g == -1 or c == g for c, g in zip(inner, graph.shape, strict=True))
    if not fits:
        shown = (f"reshape {list(given.reshape)}" if given.reshape is not None
                 else f"dims {list(given.dims)}")
        batch_note = f" (with the batch dimension: {list(inner)})" if max_batch else ""
        raise _disagree(where, shown + batch_note, f"shape {list(graph.shape)}")
    return TensorSpec(graph.name, graph.datatype, served), \
        TensorSpec(graph.name, graph.datatype, inner)


def _disagree(where: str, config: str, graph: str) -> ConfigError:
    return ConfigError(f"config.pbtxt and the graph disagree on {where}: config.pbtxt has "
                       f"{config}, the graph has {graph}")
