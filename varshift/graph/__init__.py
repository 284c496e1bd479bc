"""The model's dataflow graph: which op feeds which.

Two tracers build the same :class:`DataflowGraph`:

* :func:`fx_graph`: ``torch.fx`` symbolic tracing; needs no input. Regularizers, norms and
  torch's own layers are leaves; functional ops appear as calls.
* :func:`dynamic_graph`: runs the model once on an example input and records every tensor op
  through a ``TorchFunctionMode`` plus module hooks. For models with data-dependent Python
  control flow, which fx cannot trace.

Both trace the *training* structure: the model in train mode (so ``F.dropout(x, p,
self.training)`` appears as active) while norms stay in eval mode (running statistics are never
touched). Every module's mode is restored afterwards. :func:`trace` picks the tracer.

The modules, by job:

* :mod:`.model`: the data (:class:`Op`, :class:`DataflowGraph`, the roles, :class:`Namer`);
* :mod:`.builder`: what both tracers share (leaves, roles, the op builder);
* :mod:`.fx` and :mod:`.dynamic`: the two tracers;
* :mod:`.stochastic`: regularizers found by what they do, and what stays random at inference;
* :mod:`.kinds` (what varshift recognizes, as data) and :mod:`.sources` (source lines).

This package imports none of measure/, fix/, report/ or rules/: they read the graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import RandomAtTraceTime, TraceError, one_line
from . import kinds, sources
from .builder import _role, _single_layer_graph, is_leaf
from .dynamic import dynamic_graph
from .fx import _fx_trace, _LeafTracer, fx_graph, fx_graph_module, fx_owner
from .model import (
    BATCH_STATS_NORM,
    CONSTANT,
    FUNCTION,
    INPUT,
    MODULE,
    NORM,
    OUTPUT,
    REGULARIZER,
    Behaviour,
    DataflowGraph,
    Namer,
    Op,
)
from .stochastic import apply_eval_trace, mark_stochastic, needs_eval_trace

__all__ = [
    "BATCH_STATS_NORM", "CONSTANT", "FUNCTION", "INPUT", "MODULE", "NORM", "OUTPUT", "REGULARIZER",
    "Behaviour", "DataflowGraph", "Namer", "Op", "RandomAtTraceTime", "TraceError",
    "apply_eval_trace", "dynamic_graph", "fx_graph", "fx_graph_module", "fx_owner", "is_leaf",
    "kinds", "mark_stochastic", "needs_eval_trace", "sources", "trace",
    # private, but read here from outside: fix/frontier traces with _fx_trace, and a GraphModule
    # saved by `swap` names its tracer's class varshift.graph._LeafTracer (see fx.py)
    "_fx_trace", "_LeafTracer",
]


def trace(model: nn.Module, example_input: torch.Tensor | None = None) -> DataflowGraph:
    """The dataflow graph of ``model``: fx first, the dynamic trace when fx cannot.

    Raises:
        TraceError: fx cannot trace the model and no ``example_input`` was given (the message
            names the parameters ``input_shape`` and ``data``), or the model does not run on
            ``example_input``.
    """
    if _role(model)[0] is not None:
        return _single_layer_graph(model)
    try:
        return fx_graph(model)
    except Exception as fx_exc:  # fx raises many types for untraceable Python
        if example_input is None:
            from ..io.inputs import shape_hint

            hint = shape_hint(model)
            how = (f"pass `input_shape` (for example `input_shape={hint}`) or `data`"
                   if hint else "pass `data` (its first batch)")
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__} ({type(fx_exc).__name__}: "
                f"{one_line(fx_exc)}); {how} so varshift can trace it by running it once "
                "on an example input"
            ) from fx_exc
    return dynamic_graph(model, example_input)
