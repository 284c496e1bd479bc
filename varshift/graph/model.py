"""The dataflow graph as data: ops in execution order, and which op's value feeds which.

Both tracers (:mod:`.fx`, :mod:`.dynamic`) build a :class:`DataflowGraph`; the rules read it.
An op holds facts only (its name, what it calls, where in the user's code); what a report
calls it is the rules' business.
"""

from __future__ import annotations

import enum
import functools
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

from .._types import SourceLocation
from . import kinds

INPUT, OUTPUT, MODULE, FUNCTION, CONSTANT = "input", "output", "module", "function", "constant"
REGULARIZER, NORM = "regularizer", "norm"
#: a BatchNorm without running statistics (track_running_stats=False): batch statistics at
#: inference, a finding of its own
BATCH_STATS_NORM = "batch_stats_norm"


class Behaviour(enum.Enum):
    """How a regularizer found by what it does (kind ``stochastic``) acts."""

    #: a value drawn at random only in training multiplies, masks or shifts the data path
    #: (inline drop-path, drop-connect): ``target`` is the op that mixes it in, ``source`` the
    #: line that calls it
    RANDOM_OPERAND = "random_operand"
    #: a Python decision on a random draw (``if torch.rand(1) < p:``, LayerDrop) steers which
    #: layers run: ``target`` is the op that turned the draw into a Python value (``__bool__``)
    RANDOM_CONTROL_FLOW = "random_control_flow"


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
        source: for a regularizer or norm, the line whose code calls it, None when unknown.
        defined_at: for a regularizer or norm module, the line that created it, when knowable.
        behaviour: for a regularizer found by what it does, how it acts; None for one
            recognized by its class or function name (and for every other op).
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
    #: where the op is called and where its module was created, kept for regularizers,
    #: norms and the random and mixing ops a stochastic one may be
    source: SourceLocation | None = None
    defined_at: SourceLocation | None = None
    behaviour: Behaviour | None = None


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


class Namer:
    """Names functional ops ``owner:op``, with ``_1``, ``_2`` ... for repeats in one owner."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], itertools.count] = defaultdict(itertools.count)

    def __call__(self, owner: str, op: str) -> str:
        k = next(self._counts[(owner, op)])
        return f"{owner}:{op}" if k == 0 else f"{owner}:{op}_{k}"
