"""What both tracers share: which modules are leaves and what role they play, which arguments
carry values, and :class:`_Builder`, which turns calls into :class:`~.model.Op`\\ s."""

from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn

from .._types import SourceLocation
from . import kinds, sources
from .model import (
    BATCH_STATS_NORM,
    FUNCTION,
    INPUT,
    MODULE,
    NORM,
    OUTPUT,
    REGULARIZER,
    DataflowGraph,
    Namer,
    Op,
)

#: Ops whose number argument can say the keep probability of a random mask.
_KEEP_READERS = frozenset({"floor", "floor_", "lt", "__lt__", "le", "__le__", "gt", "__gt__",
                           "ge", "__ge__", "add", "__add__", "__radd__", "add_"})


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


def _numbers(values: Iterable[Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in values
                 if isinstance(v, (int, float)) and not isinstance(v, bool))


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
        self._defined: dict[str, SourceLocation | None] = {}

    def add(self, name, kind, target, role=None, reg=None, inputs=()) -> Op:
        op = Op(len(self.ops), name, kind, target, role, reg, tuple(sorted(set(inputs))))
        self.ops.append(op)
        return op

    def _definition(self, qualname: str) -> SourceLocation | None:
        if qualname not in self._defined:
            self._defined[qualname] = sources.definition_site(self.model, qualname)
        return self._defined[qualname]

    def add_module_call(self, qualname: str, module: nn.Module, inputs,
                        source: SourceLocation | None = None) -> Op:
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


def _single_layer_graph(model: nn.Module) -> DataflowGraph:
    """The graph of a model that *is* a norm or a regularizer (a bare ``nn.BatchNorm2d``):
    fx would trace into its forward and see only ``F.batch_norm``."""
    b = _Builder(model)
    inp = b.add("input", INPUT, "input")
    op = b.add_module_call("", model, [inp.index])
    b.add("output", OUTPUT, "output", inputs=[op.index])
    return b.graph("fx")
