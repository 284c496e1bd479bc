"""The recorded-run tracer: runs the model once on an example input and records every tensor
op through a ``TorchFunctionMode`` plus module hooks. For models with data-dependent Python
control flow, which fx cannot trace.

The run is the *training* structure (the model in train mode) with norms in eval mode, so
running statistics are never touched; every module's mode is restored afterwards. A Python
decision on a random draw (LayerDrop) becomes a regularizer of its own
(:attr:`~.model.Behaviour.RANDOM_CONTROL_FLOW`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .._torch_utils import fork_rng, preserved_modes, removing
from ..errors import TraceError, VarshiftError, one_line
from . import kinds, sources
from .builder import _Builder, _nested_regularizers, _role, _value_inputs, is_leaf
from .model import FUNCTION, INPUT, MODULE, OUTPUT, REGULARIZER, Behaviour, DataflowGraph, Op
from .stochastic import apply_eval_trace, needs_eval_trace


class _Recorder(torch.overrides.TorchFunctionMode):
    """Records every torch function call made outside leaf modules."""

    def __init__(self, tracer: "_DynamicTracer") -> None:
        super().__init__()
        self.t = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.t.leaf_depth == 0:
            name = _dyn_name(func)
            if name in kinds.CONTROL_OPS and self.t.random_decision(name, args) \
                    and self.t.force is not None and name == "__bool__":
                return self.t.force  # see _train_graph: both ways, to see every layer
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
        self._pending_inputs: list[list[int]] = []
        # random control flow (LayerDrop): which ops are random draws or computed from them
        # alone, which carry data, and per owner module the regularizer its decision makes
        self.rand: set[int] = set()
        self.data: set[int] = set()
        self.flows: dict[str, list] = {}  # owner -> [regularizer op, armed]
        self.force: bool | None = None
        self.flow_seen = False

    def random_decision(self, name: str, args: Any) -> bool:
        """A Python decision (op ``name``: ``__bool__``, ``item``...) on a random-only value
        (``if torch.rand(1) < p:``): the owner module's later ops depend on it. Returns whether
        it is one."""
        producers = set(self._producers(args))
        if not producers or not producers <= self.rand:
            return False
        self.flow_seen = True
        owner = self.stack[-1] if self.stack else ""
        if owner not in self.flows:
            op = self.b.add(f"{owner}:random_control_flow", FUNCTION, name, REGULARIZER,
                            kinds.RegularizerInfo(kinds.STOCHASTIC, None, None))
            op.behaviour = Behaviour.RANDOM_CONTROL_FLOW
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
                    self._record_leaf(name, module, output)
            if self.flows:
                self.flows.pop(name, None)  # its decisions end with it
                # a module called by the deciding one has completed: what comes next is
                # computed from a value the decision could have skipped
                caller = self.stack[-1] if self.stack else ""
                if caller in self.flows:
                    self.flows[caller][1] = True

        return hook

    def _record_leaf(self, name: str, module: nn.Module, output: Any) -> None:
        """A call of a leaf module (outside any other leaf) has returned: its op."""
        inputs = self._pending_inputs.pop()
        # the hook runs inside the module's __call__: the caller's frame is above
        where = sources.caller_location(_RUN_CODE) if _keeps_source(module) else None
        first = len(self.b.ops)
        op = self.b.add_module_call(name, module, self._with_flows(inputs), where)
        self.data.update(range(first, len(self.b.ops)))
        self._set_outputs(output, op)

    def run(self, model: nn.Module, example: Any) -> DataflowGraph:
        self._pending_inputs = []
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
    :mod:`varshift.calling` for other batches and ``call``).

    Raises:
        TraceError: the model does not run on ``example``.
    """
    try:
        graph = _train_graph(model, example)
        if needs_eval_trace(graph):
            apply_eval_trace(graph, _run_dynamic(model, example, training=False))
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
