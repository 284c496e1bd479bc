"""Regularizers found by what they do, not by name (kind ``stochastic``), and what stays
random at inference.

A random draw that meets the data path (multiplies, masks or shifts it) in training only is a
home-made drop-path or drop-connect: :func:`mark_stochastic` makes it a regularizer, reading
its keep probability off the mask's construction. The eval-mode trace says which regularizers
are still active at inference (:func:`apply_eval_trace`).
"""

from __future__ import annotations

from . import kinds
from .model import FUNCTION, INPUT, MODULE, REGULARIZER, Behaviour, DataflowGraph, Namer, Op


def _has_random(graph: DataflowGraph) -> bool:
    return any(op.kind == FUNCTION and op.target in kinds.RANDOM_OPS for op in graph.ops)


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
            op.behaviour = Behaviour.RANDOM_OPERAND
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


def needs_eval_trace(graph: DataflowGraph) -> bool:
    """Whether an eval-mode trace can tell anything: only a model with functional regularizers
    (or random draws) in train mode can stay random at inference."""
    return _has_random(graph) or any(
        op.kind == FUNCTION and op.role == REGULARIZER for op in graph.ops)


def apply_eval_trace(graph: DataflowGraph, eval_graph: DataflowGraph) -> None:
    """Fill ``graph.always_on`` from the eval-mode graph of the same model: the functional
    regularizers still active there and its random control flow; and, when the train-mode
    graph draws random numbers, mark the stochastic ops (:func:`mark_stochastic`)."""
    graph.always_on = [op for op in eval_graph.ops if _fires_in_eval(op)]
    graph.always_on += [op for op in eval_graph.ops
                        if op.behaviour is Behaviour.RANDOM_CONTROL_FLOW]
    if _has_random(graph):
        mark_stochastic(graph, eval_graph)
