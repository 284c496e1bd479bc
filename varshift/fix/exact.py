"""The exact estimator: each target norm's statistics are the population statistics of its
input on the *inference path*, with every upstream norm already in eval mode with its new
statistics. Afterwards the shift of every recalibrated norm, measured on the same data, is 1.

Two paths compute the same statistics (docs/concepts.md, "Estimators"):

- ``frontier`` (:mod:`varshift.fix.frontier`): the model's eval-mode torch.fx graph runs over
  all batches at once, cut before each target norm; about one forward pass of work, with the
  values alive at the cut kept within ``cache_mb`` (spilled to a temporary directory beyond).
- ``levels``: norms are grouped into dependency levels (a norm's level is one more than the
  deepest target norm upstream of it); one pass per level, and a pass stops as soon as the
  last norm of its level has run. For models fx cannot trace, or whose norms run more than
  once per forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .._torch_utils import preserved_modes, removing
from ..calling import forward
from ..errors import StopForward, VarshiftError
from ..graph import NORM, DataflowGraph
from ..measure.distributed import Dist
from ..measure.norms import InputStats
from ..measure.stats import ChannelMoments
from ..options import ExactPath
from ..report.results import ExactInfo
from . import frontier
from .population import Job, write_norm


def dependency_levels(scan_graph_norms: dict[str, set[str]], targets: list[str]) -> list[list[str]]:
    """Group ``targets`` into levels: a norm's level is 1 + the deepest target upstream.

    Args:
        scan_graph_norms: norm name -> names of the norms downstream of it.
    """
    target_set = set(targets)
    upstream: dict[str, set[str]] = {t: set() for t in targets}
    for src, downs in scan_graph_norms.items():
        if src in target_set:
            for d in downs:
                if d in target_set and d != src:
                    upstream[d].add(src)
    level: dict[str, int] = {}

    def depth(t: str, seen: frozenset = frozenset()) -> int:
        if t in level:
            return level[t]
        if t in seen:  # a cycle (a norm feeding itself through a loop): break it
            return 0
        d = 1 + max((depth(u, seen | {t}) for u in upstream[t]), default=-1)
        level[t] = d
        return d

    for t in targets:
        depth(t)
    out: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for t in targets:
        out[level[t]].append(t)
    return out


def _norm_reach(graph: DataflowGraph) -> dict[str, set[str]]:
    """Norm name -> the names of the norms downstream of it."""
    out: dict[str, set[str]] = {}
    for op in graph.ops:
        if op.role == NORM:
            out.setdefault(op.name, set()).update(
                graph.ops[i].name for i in graph.downstream(op.index)
            )
    return out


class _CallCounter:
    """Counts each norm's calls per forward; tells whether the counts are the same every time."""

    def __init__(self, norms: dict[str, nn.Module], names: list[str]) -> None:
        self.norms, self.names = norms, names
        self.rows: list[dict[str, int]] = []

    def begin_forward(self) -> None:
        self.rows.append({})

    def _hook(self, name: str):
        def hook(module, args):
            row = self.rows[-1]
            row[name] = row.get(name, 0) + 1

        return hook

    def attach(self, handles: list) -> "_CallCounter":
        for name in self.names:
            handles.append(self.norms[name].register_forward_pre_hook(self._hook(name)))
        return self

    def constant(self) -> dict[str, int] | None:
        """Calls per forward of every norm, or None when they differ between forwards."""
        if not self.rows or any(row != self.rows[0] for row in self.rows):
            return None
        return dict(self.rows[0])


def _same_everywhere(per_forward: dict[str, int] | None, d: Dist) -> dict[str, int] | None:
    """The calls per forward when every rank saw the same counts, else None (no early stop):
    the ranks must make the same passes."""
    if not d.active:
        return per_forward
    everyone = d.exchange(per_forward)
    return per_forward if all(p == everyone[0] for p in everyone) else None


#: The values of ``exact_path`` (see :class:`~varshift.options.ExactPath`).
EXACT_PATHS = tuple(p.value for p in list(ExactPath))


def exact(job: Job, cal: Any, graph: DataflowGraph, path: ExactPath,
          cache_mb: float | None) -> tuple[int, int, ExactInfo]:
    """The exact estimator: the frontier where the model allows it, else one pass per level.
    ``(passes, batches, how it ran)``.

    Raises:
        VarshiftError: ``path`` is ``frontier`` and the model does not allow it.
    """
    model, prepare, device = job.model, job.prepare, job.ctx.device
    reason: str | None
    if path is ExactPath.LEVELS:
        reason = "one pass per dependency level was asked for (exact_path='levels')"
    elif graph.traced_with != "fx":
        reason = "torch.fx cannot trace the model (the scan ran it instead)"
    else:
        reason = _single_tensor_input(cal, prepare)
        if reason is None:
            p = frontier.plan(model, job.targets)
            reason = p if isinstance(p, str) else None
    if reason is not None:
        if path is ExactPath.FRONTIER:
            raise VarshiftError(f"the frontier path of the exact estimator cannot run: {reason}")
        passes, n = exact_levels(job, cal, graph)
        return passes, n, ExactInfo(path="levels", reason=reason)
    budget = frontier.default_cache_mb(device) if cache_mb is None else float(cache_mb)
    d = job.ctx.dist
    if d.active:  # the default depends on each machine's free memory: one budget, the least
        budget = min(d.exchange(budget))
    total = {"batches": 0}

    def write(name, moments, n_batches):
        # Across ranks: merge this norm's moments before writing it, so that the next cut
        # runs on the merged statistics everywhere (one small exchange per norm).
        holder = _Moments({name: moments})
        total["batches"] = d.merge_stats(holder, n_batches)
        write_norm(job.norms[name], holder.moments[name], total["batches"], name)

    assert not isinstance(p, str)
    with preserved_modes(model), torch.no_grad():
        model.eval()
        feed = frontier.Feed(cal, lambda batch: prepare(batch, 0).args[0], job.ctx.progress,
                             getattr(cal, "n_batches", None))
        done = frontier.run(p, feed, write, budget, device, model)
    n_batches = total["batches"] if d.active else done.batches
    memory = (done.peak_mb, done.kept_mb, done.spilled_mb)
    if d.active:  # the report is the same on every rank: the busiest rank's memory
        memory = tuple(max(values) for values in zip(*d.exchange(memory)))
    return 1, n_batches, ExactInfo(
        path="frontier", reason=None, cuts=done.cuts, cache_mb=budget,
        default_budget=cache_mb is None,
        peak_mb=memory[0], kept_mb=memory[1], spilled_mb=memory[2])


def _single_tensor_input(cal, prepare) -> str | None:
    """None when the model is called as ``model(x)`` with one tensor (what the frontier runs:
    the traced graph's first input), else why not."""
    inv = prepare(next(iter(cal)), 0)
    if inv.call is not None:
        return "a `call` function runs the model (the frontier feeds the traced graph itself)"
    if inv.kwargs or len(inv.args) != 1 or not isinstance(inv.args[0], torch.Tensor):
        return "the model takes more than one input tensor (the frontier feeds one)"
    return None


class _Moments:
    """A bare holder of named moments for :meth:`varshift.distributed.Dist.merge_stats`."""

    def __init__(self, moments: dict[str, ChannelMoments]) -> None:
        self.moments = moments


def exact_levels(job: Job, cal: Any, graph: DataflowGraph) -> tuple[int, int]:
    """One eval pass per dependency level, each stopped after its level's last norm."""
    model, norms, targets, prepare = job.model, job.norms, job.targets, job.prepare
    levels = dependency_levels(_norm_reach(graph), targets)
    total = getattr(cal, "n_batches", None)
    per_forward: dict[str, int] | None = None
    n_batches = 0
    with preserved_modes(model), torch.no_grad():
        model.eval()
        for k, level in enumerate(levels):
            with removing([]) as handles:
                stats = InputStats(norms, level).attach(handles)
                counter = _CallCounter(norms, targets).attach(handles) if k == 0 else None
                if per_forward is not None:
                    # Stop each forward once this level's norms have all run: nothing
                    # downstream of them matters for this pass.
                    stats.stop_after = {n: per_forward[n] for n in level if n in per_forward}
                n_batches = 0
                for index, batch in enumerate(cal):
                    stats.begin_forward()
                    if counter is not None:
                        counter.begin_forward()
                    try:
                        forward(model, prepare(batch, index), index)
                    except StopForward:
                        pass
                    n_batches += 1
                    job.ctx.tick(k * (total or 0) + n_batches,
                                 None if total is None else total * len(levels))
                if counter is not None:
                    per_forward = _same_everywhere(counter.constant(), job.ctx.dist)
            n_batches = job.ctx.dist.merge_stats(stats, n_batches)
            for name in level:
                if stats.moments[name].mean is not None:
                    write_norm(norms[name], stats.moments[name], n_batches, name)
    return len(levels), n_batches
