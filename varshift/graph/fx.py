"""The torch.fx tracer: symbolic tracing, no input needed.

Regularizers, norms and torch's own layers are leaves; functional ops appear as calls. The
model is traced in train mode (so ``F.dropout(x, p, self.training)`` appears as active), and
once more in eval mode when that can show regularizers still active at inference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .._torch_utils import fork_rng, preserved_modes
from ..errors import RandomAtTraceTime
from . import kinds, sources
from .builder import _Builder, _value_inputs, is_leaf
from .model import CONSTANT, INPUT, OUTPUT, DataflowGraph
from .stochastic import apply_eval_trace, needs_eval_trace


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, record_sources: bool = False) -> None:
        super().__init__()
        self.record_sources = record_sources

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.record_sources and kind in ("call_module", "call_function", "call_method"):
            # The user's line that made this call, read off the live stack. (fx's own
            # record_stack_traces imports torch._inductor on first use, seconds, and can
            # swallow a Ctrl-C that lands in that import.)
            node.meta[_SOURCE_KEY] = sources.caller_location(_FX_TRACE_CODE)
        return node


# A GraphModule keeps its tracer's class, and torch.save writes it by qualified name: files
# saved before the tracers were split into modules name ``varshift.graph._LeafTracer``, and
# new ones must too (the package re-exports the class under that name).
_LeafTracer.__module__ = "varshift.graph"

_SOURCE_KEY = "varshift_source"
_FX_TRACE_CODE = torch.fx.Tracer.trace.__code__


def _fx_trace(
    model: nn.Module, training: bool, record_sources: bool = False
) -> tuple[nn.Module, torch.fx.Graph]:
    """Trace in train (or eval) mode, restoring the modes: (root, graph). Raises what fx raises,
    and RandomAtTraceTime when tracing drew random numbers. ``record_sources`` keeps each
    call's source line in ``node.meta``."""
    with preserved_modes(model), fork_rng(torch.device("cpu")):
        model.train(training)
        torch.manual_seed(0)
        state = torch.get_rng_state()
        tracer = _LeafTracer(record_sources)
        graph = tracer.trace(model)
        if not torch.equal(state, torch.get_rng_state()):
            raise RandomAtTraceTime(
                "random numbers drawn while tracing (random control flow, or a draw that "
                "does not depend on the input)")
    return tracer.root, graph


def fx_graph_module(model: nn.Module, training: bool = True) -> torch.fx.GraphModule:
    """An fx GraphModule of ``model`` traced in train (or eval) mode, norms as leaves.

    The model's modes are restored afterwards. Raises whatever fx raises when it cannot trace.
    """
    return torch.fx.GraphModule(*_fx_trace(model, training))


def _op_name(node: torch.fx.Node) -> str:
    """The function or method a node calls, else its fx op (``placeholder``, ``output``)."""
    if node.op == "call_function":
        return kinds.function_name(node.target)
    if node.op == "call_method":
        return str(node.target)
    return node.op


def _producers(node: torch.fx.Node, name: str) -> list[torch.fx.Node]:
    """The nodes whose values flow into ``node`` (none through shape-only arguments)."""
    if node.op not in ("call_function", "call_method"):
        return _nodes_in([node.args, node.kwargs])
    head = _value_inputs(name, list(node.args), first_only=False)
    rest_kw = [] if name in kinds.META_OPS or name in kinds.FIRST_ARG_ONLY_OPS else list(
        node.kwargs.values()
    )
    return _nodes_in(head + rest_kw)


def _fx_to_dataflow(root: nn.Module, graph: torch.fx.Graph) -> DataflowGraph:
    b = _Builder(root)
    index: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        inputs = [index[n] for n in _producers(node, _op_name(node)) if n in index]
        if node.op == "placeholder":
            op = b.add(node.name, INPUT, "input")
        elif node.op == "get_attr":
            op = b.add(str(node.target), CONSTANT, "get_attr")
        elif node.op == "call_module":
            op = b.add_module_call(str(node.target), root.get_submodule(str(node.target)),
                                   inputs, node.meta.get(_SOURCE_KEY))
        elif node.op in ("call_function", "call_method"):
            op = b.add_function_call(fx_owner(node), node.target, node.args, node.kwargs, inputs,
                                     node.meta.get(_SOURCE_KEY))
            if kinds.is_inplace(node.target, tuple(node.args), dict(node.kwargs)):
                # fx nodes are values, not tensors: after `a.add_(b)` later uses of `a` still
                # name a's node, whatever the in-place op's own node feeds. Rebind `a` (and the
                # tensors it is a view of) so that they carry the write.
                for written in _fx_view_chain(node.args[0] if node.args else None):
                    index[written] = op.index
        else:
            op = b.add("output", OUTPUT, "output", inputs=inputs)
        index[node] = op.index
    return b.graph("fx")


def _fx_view_chain(arg: Any) -> list[torch.fx.Node]:
    """``arg`` and, when it is a view (``a[:, :2]``, ``a.transpose(0, 1)``), what it views."""
    chain: list[torch.fx.Node] = []
    while isinstance(arg, torch.fx.Node) and arg not in chain:
        chain.append(arg)
        if arg.op not in ("call_function", "call_method"):
            break
        if _op_name(arg) not in kinds.VIEW_OPS or not arg.args:
            break
        arg = arg.args[0]
    return chain


def _nodes_in(obj: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []

    def collect(n: torch.fx.Node) -> torch.fx.Node:
        found.append(n)
        return n

    torch.fx.node.map_arg(obj, collect)
    return found


def fx_owner(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    qual = list(stack.values())[-1][0]
    return qual if isinstance(qual, str) else str(qual)


def fx_graph(model: nn.Module) -> DataflowGraph:
    """Trace ``model`` with torch.fx (train-mode structure). Raises if fx cannot trace it."""
    graph = _fx_to_dataflow(*_fx_trace(model, training=True, record_sources=True))
    # Functional dropout that stays on at inference shows in an eval-mode trace. Only a model
    # with functional regularizers (or random draws) in train mode needs it.
    if needs_eval_trace(graph):
        apply_eval_trace(graph, _fx_to_dataflow(*_fx_trace(model, training=False,
                                                          record_sources=True)))
    return graph
