"""The model's dataflow graph: which op feeds which.

Two tracers build the same :class:`DataflowGraph`:

* :func:`fx_graph`: ``torch.fx`` symbolic tracing; needs no input. Regularizers, norms and
  torch's own layers are leaves; functional ops appear as calls.
* :func:`dynamic_graph`: runs the model once on an example input and records every tensor op
  through a ``TorchFunctionMode`` plus module hooks. For models with data-dependent Python
  control flow, which fx cannot trace.

Both trace the *training* structure: the model in train mode (so ``F.dropout(x, p,
self.training)`` appears as active) while norms stay in eval mode (running statistics are never
touched). Every module's mode is restored afterwards.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from .._torch_utils import fork_rng, preserved_modes, removing
from ..errors import RandomAtTraceTime, TraceError, VarshiftError, one_line
from . import kinds, sources

INPUT, OUTPUT, MODULE, FUNCTION, CONSTANT = "input", "output", "module", "function", "constant"
REGULARIZER, NORM = "regularizer", "norm"
#: a BatchNorm without running statistics (track_running_stats=False): batch statistics at
#: inference, a finding of its own
BATCH_STATS_NORM = "batch_stats_norm"


@dataclass
class Op:
    """One call in the dataflow graph.

    Attributes:
        index: position in execution order.
        name: a module call's qualified name (``features.norm0``); a functional call's owner
            module plus ``:`` and the op (``features.denseblock1.denselayer3:dropout``).
        kind: ``module``, ``function``, ``input``, ``output`` or ``constant``.
        target: the module's class name or the function's name.
        role: ``regularizer``, ``norm`` or None.
        reg: for a regularizer, its kind, p and (functional) training flag.
        inputs: indices of the ops whose *values* flow into this one.
        source: for a regularizer or norm, the line whose code calls it (a
            :class:`~varshift.reports.SourceLocation`), None when unknown.
        defined_at: for a regularizer or norm module, the line that created it, when knowable.
    """

    index: int
    name: str
    kind: str
    target: str
    role: str | None = None
    reg: kinds.RegularizerInfo | None = None
    inputs: tuple[int, ...] = ()
    #: number arguments of a functional call (read for a stochastic op's keep probability)
    consts: tuple[float, ...] = ()
    #: where the op is called and where its module was created (``SourceLocation``s), kept
    #: for regularizers, norms and the random and mixing ops a stochastic one may be
    source: Any = None
    defined_at: Any = None


@dataclass
class DataflowGraph:
    """Ops in execution order and how values flow between them."""

    ops: list[Op]
    traced_with: str  # "fx" or "dynamic"
    #: functional regularizers that are active with the model in eval mode (inference random)
    always_on: list[Op] = field(default_factory=list)
    module_types: dict[str, str] = field(default_factory=dict)
    #: random draws that never reach the data path (``owner:op`` names)
    idle_random: list[str] = field(default_factory=list)

    @functools.cached_property
    def _users(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for op in self.ops:
            for i in op.inputs:
                out[i].append(op.index)
        return out

    def users(self) -> dict[int, list[int]]:
        """Op index -> the indices of the ops its value flows into (the graph is complete
        once built, so this is computed once)."""
        return self._users

    def downstream(self, start: int, stop_at_norms: bool = False) -> list[int]:
        """Indices of the norm ops reachable from op ``start`` (not counting ``start``).

        With ``stop_at_norms`` the search does not continue past a norm: it returns the
        *direct* norms only.
        """
        users = self.users()
        seen: set[int] = set()
        found: list[int] = []
        stack = list(users.get(start, ()))
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if self.ops[i].role == NORM:
                found.append(i)
                if stop_at_norms:
                    continue
            stack.extend(users.get(i, ()))
        return sorted(found)


# --------------------------------------------------------------------------- helpers


def _is_torch_leaf(module: nn.Module) -> bool:
    """torch.fx's default: torch.nn layers are leaves, containers are not."""
    mod = type(module).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


def _role(module: nn.Module) -> tuple[str | None, kinds.RegularizerInfo | None]:
    reg = kinds.regularizer_of_module(module)
    if reg is not None:
        return REGULARIZER, reg
    if kinds.is_norm(module):
        return NORM, None
    if kinds.is_batch_stats_norm(module):
        return BATCH_STATS_NORM, None
    return None, None


def is_leaf(module: nn.Module) -> bool:
    """Leaves of the graph: regularizers, norms, and torch's own layers."""
    return _role(module)[0] is not None or _is_torch_leaf(module)


def _value_inputs(name: str, args: Iterable[Any], first_only: bool) -> list[Any]:
    """The arguments whose values flow through op ``name`` (none for shape-only ops)."""
    args = list(args)
    if name in kinds.META_OPS:
        return []
    if name in ("getattr", "__get__") and len(args) > 1 and args[1] in kinds.META_OPS:
        return []
    if name in kinds.FIRST_ARG_ONLY_OPS or first_only:
        return args[:1]
    return args


class Namer:
    """Names functional ops ``owner:op``, with ``_1``, ``_2`` ... for repeats in one owner."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], itertools.count] = defaultdict(itertools.count)

    def __call__(self, owner: str, op: str) -> str:
        k = next(self._counts[(owner, op)])
        return f"{owner}:{op}" if k == 0 else f"{owner}:{op}_{k}"


def _nested_regularizers(module: nn.Module) -> list[tuple[str, str, kinds.RegularizerInfo]]:
    """Regularizers inside a leaf: timm's ``BatchNormAct2d(drop_layer=...)``, the dropouts of
    ``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention(dropout=...)``.

    Returns ``(suffix, type name, info)``: suffix ``.sub.name`` for a submodule, ``:dropout``
    for an attribute. Their effect is attributed to the leaf's output.
    """
    out = []
    for sub_name, sub in module.named_modules():
        prefix = f".{sub_name}" if sub_name else ""
        if sub_name:
            reg = kinds.regularizer_of_module(sub)
            if reg is not None:
                out.append((prefix, type(sub).__name__, reg))
                continue
        attr = kinds.ATTRIBUTE_REGULARIZERS.get(type(sub).__name__)
        if attr is not None:
            p = getattr(sub, attr[0], None)
            if isinstance(p, (int, float)) and kinds.attribute_applies(sub):
                out.append((f"{prefix}:{attr[0]}", type(sub).__name__, kinds.RegularizerInfo(
                    attr[1], float(p), None)))
    return out


class _Builder:
    """Accumulates ops; shared by both tracers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ops: list[Op] = []
        self.namer = Namer()
        self.module_types: dict[str, str] = {}
        self._defined: dict[str, Any] = {}

    def add(self, name, kind, target, role=None, reg=None, inputs=()) -> Op:
        op = Op(len(self.ops), name, kind, target, role, reg, tuple(sorted(set(inputs))))
        self.ops.append(op)
        return op

    def _definition(self, qualname: str) -> Any:
        if qualname not in self._defined:
            self._defined[qualname] = sources.definition_site(self.model, qualname)
        return self._defined[qualname]

    def add_module_call(self, qualname: str, module: nn.Module, inputs, source=None) -> Op:
        """A module call; ``source`` (the calling line) is kept for regularizers and norms,
        and so is the line that created the module (nested regularizers: the host's call)."""
        role, reg = _role(module)
        self.module_types[qualname] = type(module).__name__
        op = self.add(qualname, MODULE, type(module).__name__, role, reg, inputs)
        if role is not None:
            op.source, op.defined_at = source, self._definition(qualname)
        if role != REGULARIZER:
            for suffix, type_name, sub_reg in _nested_regularizers(module):
                full = f"{qualname}{suffix}"
                kind = FUNCTION if ":" in suffix else MODULE
                self.module_types[full] = type_name
                op = self.add(full, kind, type_name, REGULARIZER, sub_reg, [op.index])
                op.source = source
                op.defined_at = self._definition(full) if kind == MODULE else None
        return op

    def add_function_call(
        self, owner: str, fn: Any, args: tuple, kwargs: dict, inputs, source: Any = None
    ) -> Op:
        """A functional call; ``source`` may be a location or a zero-argument callable that
        finds it (called only for regularizers: reading the stack for every op is waste)."""
        name = kinds.function_name(fn)
        reg = kinds.regularizer_of_call(fn, args, kwargs) if not isinstance(fn, str) else None
        role = REGULARIZER if reg is not None else None
        qual = self.namer(owner, name) if reg is not None else f"{owner}:{name}"
        op = self.add(qual, FUNCTION, name, role, reg, inputs)
        if role is not None or name in kinds.RANDOM_OPS:
            op.source = source() if callable(source) else source
        elif name in kinds.MIXING_OPS and not callable(source):
            op.source = source  # already read (fx); the dynamic trace reads it when it must
        if name in kinds.RANDOM_OPS or name in kinds.MIXING_OPS or name in _KEEP_READERS:
            op.consts = _numbers((*args, *kwargs.values()))
        return op

    def graph(self, traced_with: str) -> DataflowGraph:
        return DataflowGraph(self.ops, traced_with, module_types=self.module_types)


# --------------------------------------------------------------------------- fx


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


def _fx_to_dataflow(root: nn.Module, graph: torch.fx.Graph) -> DataflowGraph:
    b = _Builder(root)
    index: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            name = kinds.function_name(node.target)
        elif node.op == "call_method":
            name = node.target
        else:
            name = node.op
        if node.op in ("call_function", "call_method"):
            positional = list(node.args)
            head = _value_inputs(name, positional, first_only=False)
            rest_kw = [] if name in kinds.META_OPS or name in kinds.FIRST_ARG_ONLY_OPS else list(
                node.kwargs.values()
            )
            producers = _nodes_in(head + rest_kw)
        else:
            producers = _nodes_in([node.args, node.kwargs])
        inputs = [index[n] for n in producers if n in index]
        if node.op == "placeholder":
            op = b.add(node.name, INPUT, "input")
        elif node.op == "get_attr":
            op = b.add(str(node.target), CONSTANT, "get_attr")
        elif node.op == "call_module":
            op = b.add_module_call(str(node.target), root.get_submodule(node.target), inputs,
                                   node.meta.get(_SOURCE_KEY))
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
        if arg.op == "call_function":
            name = kinds.function_name(arg.target)
        elif arg.op == "call_method":
            name = arg.target
        else:
            break
        if name not in kinds.VIEW_OPS or not arg.args:
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
    random = _has_random(graph)
    # Functional dropout that stays on at inference shows in an eval-mode trace. Only a model
    # with functional regularizers (or random draws) in train mode needs it.
    eval_graph = None
    if random or any(op.kind == FUNCTION and op.role == REGULARIZER for op in graph.ops):
        eval_graph = _fx_to_dataflow(*_fx_trace(model, training=False, record_sources=True))
        graph.always_on = [op for op in eval_graph.ops if _fires_in_eval(op)]
    if random:
        mark_stochastic(graph, eval_graph)
    return graph


# --------------------------------------------------------------------------- stochastic ops


#: Ops whose number argument can say the keep probability of a random mask.
_KEEP_READERS = frozenset({"floor", "floor_", "lt", "__lt__", "le", "__le__", "gt", "__gt__",
                           "ge", "__ge__", "add", "__add__", "__radd__", "add_"})


def _numbers(values: Iterable[Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in values
                 if isinstance(v, (int, float)) and not isinstance(v, bool))


def _has_random(graph: DataflowGraph) -> bool:
    return any(op.kind == FUNCTION and op.target in kinds.RANDOM_OPS for op in graph.ops)


def _where(op: Op) -> str:
    """``file.py:12 in drop_connect`` for an op's call site ("" when unknown)."""
    src = op.source
    if src is None:
        return ""
    import os

    return f"{os.path.basename(src.file)}:{src.line}" + (f" in {src.function}" if src.function else "")


def _random_closure(graph: DataflowGraph) -> tuple[set[int], set[int]]:
    """(random-only ops, data ops): a random draw and what is computed from random draws and
    constants alone; and everything the model's inputs, parameters or modules flow into."""
    random_only: set[int] = set()
    data: set[int] = set()
    for op in graph.ops:
        if op.kind == INPUT or op.kind == MODULE or op.role is not None:
            data.add(op.index)
            continue
        ins = set(op.inputs)
        if op.kind == FUNCTION and op.target in kinds.RANDOM_OPS and not (ins & data):
            random_only.add(op.index)
        elif ins & data:
            data.add(op.index)
        elif ins and ins <= random_only:
            random_only.add(op.index)
    return random_only, data


def _keep_probability(graph: DataflowGraph, start: int, random_only: set[int]) -> float | None:
    """The keep probability a random mask encodes, read from its construction: ``floor(keep +
    rand)``, ``rand < keep``, ``rand >= p``, ``bernoulli_(keep)``; None when it cannot tell."""
    stack, seen = [start], set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        op = graph.ops[i]
        c = next((v for v in op.consts if 0 < v < 1), None)
        if c is not None:
            if op.target in ("bernoulli", "bernoulli_", "lt", "__lt__", "le", "__le__") or (
                    op.target in ("add", "__add__", "__radd__", "add_")):
                return c
            if op.target in ("gt", "__gt__", "ge", "__ge__"):
                return 1 - c
        stack.extend(j for j in op.inputs if j in random_only)
    return None


def _stochastic_candidates(graph: DataflowGraph) -> dict[str, Op]:
    random_only, data = _random_closure(graph)
    found: dict[str, Op] = {}
    for op in graph.ops:
        if op.kind != FUNCTION or op.role is not None or op.target not in kinds.MIXING_OPS:
            continue
        rnd = [i for i in op.inputs if i in random_only]
        if rnd and any(i in data for i in op.inputs):
            found[op.name] = op
            keep = next((k for k in (_keep_probability(graph, i, random_only) for i in rnd)
                         if k is not None), None)
            op.reg = kinds.RegularizerInfo(kinds.STOCHASTIC, None if keep is None else 1 - keep,
                                           None)
    mixed = {i for op in found.values() for i in op.inputs}
    graph.idle_random = sorted({
        op.name for op in graph.ops
        if op.kind == FUNCTION and op.target in kinds.RANDOM_OPS
        and not _reaches_any(graph, op.index, mixed | {o.index for o in found.values()})})
    return found


def _reaches_any(graph: DataflowGraph, start: int, targets: set[int]) -> bool:
    users = graph.users()
    stack, seen = [start], set()
    while stack:
        i = stack.pop()
        if i in targets:
            return True
        if i in seen:
            continue
        seen.add(i)
        stack.extend(users.get(i, ()))
    return False


def mark_stochastic(graph: DataflowGraph, eval_graph: DataflowGraph | None) -> None:
    """Make regularizers of kind ``stochastic`` of the ops where a random draw meets the data
    path (multiplies, masks or shifts it), when that happens in training only; the same op in
    the eval-mode graph too (noise at inference) goes to ``always_on``."""
    found = _stochastic_candidates(graph)
    at_eval = _stochastic_candidates(eval_graph) if eval_graph is not None else {}
    for ops, training in ((found, None), (at_eval, True)):
        namer = Namer()
        for op in ops.values():
            op.role = REGULARIZER
            op.reg = kinds.RegularizerInfo(kinds.STOCHASTIC, op.reg.p if op.reg else None, training)
            op.name = namer(op.name.split(":", 1)[0], _function_of(op))
            if op.source is not None:
                op.target = f"{op.target} at {_where(op)}"
    graph.always_on += list(at_eval.values())


def _function_of(op: Op) -> str:
    """A stochastic op is named after the Python function that computes it (``drop_connect``),
    or after the op when that is a ``forward``."""
    fn = op.source.function if op.source is not None else None
    if fn and fn not in ("forward", "<module>", "<lambda>"):
        return fn
    return op.target


def _fires_in_eval(op: Op) -> bool:
    return (
        op.kind == FUNCTION
        and op.reg is not None
        and op.reg.training is True
        and (op.reg.p or 0) > 0
    )


# --------------------------------------------------------------------------- dynamic


class _Recorder(torch.overrides.TorchFunctionMode):
    """Records every torch function call made outside leaf modules."""

    def __init__(self, tracer: "_DynamicTracer") -> None:
        super().__init__()
        self.t = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.t.leaf_depth == 0 and _dyn_name(func) in kinds.CONTROL_OPS \
                and self.t.random_decision(args) and self.t.force is not None \
                and _dyn_name(func) == "__bool__":
            return self.t.force  # see dynamic_graph: both ways, to see every layer
        out = func(*args, **kwargs)
        if self.t.leaf_depth == 0:
            self.t.record_call(func, args, kwargs, out)
        return out


def _dyn_name(func: Any) -> str:
    name = kinds.function_name(func)
    if name == "__get__" and hasattr(func, "__self__"):
        return getattr(func.__self__, "__name__", name)  # a property: x.shape, x.T
    return name


class _DynamicTracer:
    def __init__(self, model: nn.Module) -> None:
        self.b = _Builder(model)
        self.producer: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique while tracing
        self.leaf_depth = 0
        self.stack: list[str] = []
        # random control flow (LayerDrop): which ops are random draws or computed from them
        # alone, which carry data, and per owner module the regularizer its decision makes
        self.rand: set[int] = set()
        self.data: set[int] = set()
        self.flows: dict[str, list] = {}  # owner -> [regularizer op, armed]
        self.force: bool | None = None
        self.flow_seen = False

    def random_decision(self, args: Any) -> bool:
        """A Python decision on a random-only value (``if torch.rand(1) < p:``): the owner
        module's later ops depend on it. Returns whether it is one."""
        producers = set(self._producers(args))
        if not producers or not producers <= self.rand:
            return False
        self.flow_seen = True
        owner = self.stack[-1] if self.stack else ""
        if owner not in self.flows:
            op = self.b.add(f"{owner}:random_control_flow", FUNCTION, "random control flow",
                            REGULARIZER, kinds.RegularizerInfo(kinds.STOCHASTIC, None, None))
            op.source = sources.caller_location(_RUN_CODE)
            self.flows[owner] = [op, False]
        return True

    def _with_flows(self, inputs: list[int]) -> list[int]:
        """Data that is computed after a random decision (once a module call has completed
        since, so the first layer's own input does not count) depends on it."""
        if not self.flows or not set(inputs) & self.data:
            return inputs
        extra = [op.index for owner, (op, armed) in self.flows.items()
                 if armed and (owner == "" or owner in self.stack)]
        return [*inputs, *extra]

    def _classify(self, op: Op, random_source: bool) -> None:
        ins = set(op.inputs)
        if random_source and not ins & self.data:
            self.rand.add(op.index)
        elif ins & self.data or op.kind == MODULE:
            self.data.add(op.index)
        elif ins and ins <= self.rand:
            self.rand.add(op.index)

    def _tensors(self, obj: Any) -> list[torch.Tensor]:
        leaves, _ = torch.utils._pytree.tree_flatten(obj)
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    def _producers(self, obj: Any) -> list[int]:
        return [self.producer[id(t)] for t in self._tensors(obj) if id(t) in self.producer]

    def _set_outputs(self, obj: Any, op: Op) -> None:
        for t in self._tensors(obj):
            self.producer[id(t)] = op.index
            self.keep.append(t)

    def record_call(self, func, args, kwargs, out) -> None:
        name = _dyn_name(func)
        value_args = _value_inputs(name, args, first_only=False)
        kw = {} if name in kinds.META_OPS or name in kinds.FIRST_ARG_ONLY_OPS else kwargs
        inputs = self._producers((value_args, kw))
        if not self._tensors(out) and name not in ("__setitem__",) and not name.endswith("_"):
            return  # shape arithmetic and the like: nothing flows on
        owner = self.stack[-1] if self.stack else ""
        op = self.b.add_function_call(owner, func, tuple(args), dict(kwargs),
                                      self._with_flows(inputs),
                                      lambda: sources.caller_location(_RUN_CODE))
        self._classify(op, name in kinds.RANDOM_OPS)
        ins = set(op.inputs)
        if op.source is None and name in kinds.MIXING_OPS and ins & self.rand and ins & self.data:
            # where a stochastic op may be (random draw times data): only there, tracebacks cost
            op.source = sources.caller_location(_RUN_CODE)
        self._set_outputs(out, op)
        if kinds.is_inplace(func, args, kwargs) and args and isinstance(args[0], torch.Tensor):
            self._set_outputs(args[0], op)
            if args[0]._base is not None:  # a write into a view is a write into its base
                self._set_outputs(args[0]._base, op)
        if isinstance(kwargs.get("out"), torch.Tensor):
            self._set_outputs(kwargs["out"], op)

    def pre_hook(self, name: str, leaf: bool):
        def hook(module, args, kwargs):
            if leaf:
                if self.leaf_depth == 0:
                    self._pending_inputs.append(self._producers((args, kwargs)))
                self.leaf_depth += 1
            self.stack.append(name)

        return hook

    def post_hook(self, name: str, leaf: bool):
        def hook(module, args, kwargs, output):
            self.stack.pop()
            if leaf:
                self.leaf_depth -= 1
                if self.leaf_depth == 0:
                    inputs = self._pending_inputs.pop()
                    # the hook runs inside the module's __call__: the caller's frame is above
                    where = sources.caller_location(_RUN_CODE) if _keeps_source(module) else None
                    first = len(self.b.ops)
                    op = self.b.add_module_call(name, module, self._with_flows(inputs), where)
                    self.data.update(range(first, len(self.b.ops)))
                    self._set_outputs(output, op)
            if self.flows:
                self.flows.pop(name, None)  # its decisions end with it
                # a module called by the deciding one has completed: what comes next is
                # computed from a value the decision could have skipped
                caller = self.stack[-1] if self.stack else ""
                if caller in self.flows:
                    self.flows[caller][1] = True

        return hook

    def run(self, model: nn.Module, example: Any) -> DataflowGraph:
        self._pending_inputs: list[list[int]] = []
        inp = self.b.add("input", INPUT, "input")
        self.data.add(inp.index)
        self._set_outputs(_example_tensors(example), inp)
        handles: list = []
        with removing(handles):
            for name, module in model.named_modules():
                if not name:
                    continue
                leaf = is_leaf(module)
                handles.append(
                    module.register_forward_pre_hook(self.pre_hook(name, leaf), with_kwargs=True)
                )
                handles.append(
                    module.register_forward_hook(self.post_hook(name, leaf), with_kwargs=True)
                )
            with _Recorder(self):
                out = _run_example(model, example)
        self.b.add("output", OUTPUT, "output", inputs=self._producers(out))
        return self.b.graph("dynamic")


_RUN_CODE = _DynamicTracer.run.__code__


def _keeps_source(module: nn.Module) -> bool:
    """True for regularizers and norms (the ops whose source locations are kept)."""
    return _role(module)[0] is not None or bool(_nested_regularizers(module))


def _example_tensors(example: Any) -> Any:
    """The tensors of an example: a tensor, or an Invocation's inputs (varshift.calling)."""
    return example.inputs() if hasattr(example, "inputs") else example


def _run_example(model: nn.Module, example: Any) -> Any:
    return example.run(model) if hasattr(example, "run") else model(example)


def _example_device(example: Any) -> torch.device:
    from ..calling import tensors

    found = tensors(_example_tensors(example))
    return found[0].device if found else torch.device("cpu")


def _run_dynamic(model: nn.Module, example: Any, training: bool,
                 force: bool | None = None) -> DataflowGraph:
    return _trace_dynamic(model, example, training, force)[0]


def _trace_dynamic(model: nn.Module, example: Any, training: bool,
                   force: bool | None = None) -> tuple[DataflowGraph, bool]:
    """One recorded run: (graph, whether a random decision steered Python control flow)."""
    with preserved_modes(model), torch.no_grad(), fork_rng(_example_device(example)):
        torch.manual_seed(0)  # the same trace on every run, random draws and all
        model.train(training)
        for m in model.modules():
            if kinds.is_norm(m):
                m.eval()  # running statistics stay untouched; batch size 1 works
        tracer = _DynamicTracer(model)
        tracer.force = force
        graph = tracer.run(model, example)
        return graph, tracer.flow_seen


def _train_graph(model: nn.Module, example: Any) -> DataflowGraph:
    """The train-mode recorded graph. With random control flow (LayerDrop), one run may skip
    layers by chance: run with every random decision forced each way and keep the run that
    saw more, so the scan is the same on every run and sees every layer."""
    graph, flow = _trace_dynamic(model, example, True)
    if not flow:
        return graph
    runs = [_trace_dynamic(model, example, True, force)[0] for force in (False, True)]
    return max(runs, key=lambda g: len(g.ops))


def dynamic_graph(model: nn.Module, example: Any) -> DataflowGraph:
    """Trace ``model`` by running it once on ``example`` (a tensor, or an Invocation from
    :mod:`varshift.calling` for other batches and ``--call``).

    Raises:
        TraceError: the model does not run on ``example``.
    """
    try:
        graph = _train_graph(model, example)
        random = _has_random(graph)
        if random or any(op.kind == FUNCTION and op.role == REGULARIZER for op in graph.ops):
            eval_graph = _run_dynamic(model, example, training=False)
            graph.always_on = [op for op in eval_graph.ops if _fires_in_eval(op)]
            graph.always_on += [op for op in eval_graph.ops
                                if op.target == "random control flow"]
            if random:
                mark_stochastic(graph, eval_graph)
    except VarshiftError:
        raise
    except Exception as exc:  # the user's model raised on the example input
        from ..calling import describe

        what = (f"an example input of shape {tuple(example.shape)}"
                if isinstance(example, torch.Tensor) else f"the batch {describe(example)}")
        raise TraceError(
            f"the model does not run on {what}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    return graph


def _single_layer_graph(model: nn.Module) -> DataflowGraph:
    """The graph of a model that *is* a norm or a regularizer (a bare ``nn.BatchNorm2d``):
    fx would trace into its forward and see only ``F.batch_norm``."""
    b = _Builder(model)
    inp = b.add("input", INPUT, "input")
    op = b.add_module_call("", model, [inp.index])
    b.add("output", OUTPUT, "output", inputs=[op.index])
    return b.graph("fx")


def trace(model: nn.Module, example_input: torch.Tensor | None = None) -> DataflowGraph:
    """The dataflow graph of ``model``: fx first, the dynamic trace when fx cannot.

    Raises:
        TraceError: fx cannot trace the model and no ``example_input`` was given (the message
            names ``--input-shape``), or the model does not run on ``example_input``.
    """
    if _role(model)[0] is not None:
        return _single_layer_graph(model)
    try:
        return fx_graph(model)
    except Exception as fx_exc:  # fx raises many types for untraceable Python
        if example_input is None:
            from ..io.inputs import shape_hint

            hint = shape_hint(model)
            how = (f"pass --input-shape (for example --input-shape {hint}) or --data"
                   if hint else "pass --data (its first batch)")
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__} ({type(fx_exc).__name__}: "
                f"{one_line(fx_exc)}); {how} so varshift can trace it by running it once "
                "on an example input"
            ) from fx_exc
    return dynamic_graph(model, example_input)
