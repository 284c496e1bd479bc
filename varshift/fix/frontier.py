"""The exact estimator at the cost of about one forward pass: a frontier over the fx graph.

The exact estimator needs each target norm's input on the inference path with every target
norm upstream of it already holding its new statistics. Re-running the model from its input
once per dependency level (the fallback, :func:`varshift.recalib._exact_levels`) costs one
pass per level: 118 on DenseNet-121. Here the model's eval-mode ``torch.fx`` graph is run
node by node over *all* calibration batches at once, and cut just before each target norm:

1. run every batch from the previous cut up to the norm (each node once per batch);
2. keep, per batch, only the values that later nodes still read (the frontier);
3. merge the norm's input over all batches (float64, Chan, exactly as the per-level estimator
   does), write the new statistics into the norm;
4. continue from the kept values, the norm now normalizing with its new statistics.

Every node runs once per batch, and nothing after the last target norm runs at all, so the
work is at most one forward pass; the cost moves to memory, the frontier's values for every
batch. They are kept within ``cache_mb``; a batch whose values do not fit is written to a
private temporary directory and read back at the next cut (slower, never wrong). The
directory is removed on success, on error and on Ctrl-C.

:func:`plan` says why a model cannot take this path (fx cannot trace it, a target norm runs
more than once per forward or inside another leaf module, a hook the graph would bypass);
the caller then uses the per-level estimator.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn as nn

from ..errors import DataError
from ..io.inputs import fit_error
from ..measure.stats import ChannelMoments
from ..options import check_cache_mb as check_cache_mb  # re-exported: its old home

#: Fraction of the memory available when the run starts that the frontier may use by default.
DEFAULT_CACHE_FRACTION = 0.5
#: Default budget when the available memory cannot be read (MiB).
FALLBACK_CACHE_MB = 1024.0
MB = 1024 * 1024


@dataclass
class FrontierPlan:
    """An eval-mode fx graph of the model, cut before each target norm.

    Attributes:
        root: the traced module (the model itself: every submodule and tensor is its own).
        nodes: the nodes to run, in order (the tail after the last cut is dropped).
        cuts: ``(node index, norm name)`` per target norm, in node order.
        free_after: node index -> the nodes whose value nothing at or after the next index
            reads (freed as soon as that node has run).
        skipped: target norms that never run in the model (left untouched, as by the
            per-level estimator).
    """

    root: nn.Module
    nodes: list[torch.fx.Node]
    cuts: list[tuple[int, str]]
    free_after: list[list[torch.fx.Node]]
    skipped: list[str] = field(default_factory=list)


@dataclass
class FrontierRun:
    """What a frontier run did.

    Attributes:
        batches: calibration batches (the data is read once).
        cuts: the number of cuts (one per recalibrated norm).
        cache_mb: the memory budget for the frontier's values (MiB).
        peak_mb: the largest total size of the frontier's values over all batches at a cut
            (MiB), whether kept in memory or spilled.
        kept_mb: the most of them held in memory at once (MiB; at most ``cache_mb``).
        spilled_mb: the total written to the temporary directory (MiB; 0 when it all fit).
    """

    batches: int
    cuts: int
    cache_mb: float
    peak_mb: float = 0.0
    kept_mb: float = 0.0
    spilled_mb: float = 0.0


def default_cache_mb(device: torch.device) -> float:
    """Half the memory available now: ``MemAvailable`` (CPU) or the device's free memory
    (CUDA); 1024 MiB when it cannot be read."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return DEFAULT_CACHE_FRACTION * free / MB
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return DEFAULT_CACHE_FRACTION * int(line.split()[1]) / 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return FALLBACK_CACHE_MB


# --------------------------------------------------------------------------- planning


def _hooked_containers(model: nn.Module, leaf_names: set[str]) -> list[str]:
    """Non-leaf modules with forward hooks: the fx graph inlines them, so their hooks would
    not run."""
    out = []
    for name, m in model.named_modules():
        if name in leaf_names:
            continue
        if m._forward_hooks or m._forward_pre_hooks:
            out.append(name or "(root)")
    return out


def plan(model: nn.Module, targets: list[str]) -> FrontierPlan | str:
    """Cut the model's eval-mode fx graph before each of ``targets``.

    Returns:
        A :class:`FrontierPlan`, or a one-line reason why the model needs the per-level
        estimator instead.
    """
    from ..graph import _fx_trace

    try:
        # The graph alone: a GraphModule would also generate and compile code never run.
        root, graph = _fx_trace(model, training=False)
    except Exception as exc:  # fx raises many types for untraceable Python
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return f"torch.fx cannot trace the model in eval mode ({type(exc).__name__}: {text})"
    nodes = list(graph.nodes)
    calls: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(i)
    leaf_names = set(calls)
    hooked = _hooked_containers(model, leaf_names)
    if hooked:
        return (f"{', '.join(hooked[:3])} {'has' if len(hooked) == 1 else 'have'} forward "
                "hooks that a graph run would bypass")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders or any(not p.args for p in placeholders[1:]):
        return "the model's forward takes more than one input without defaults"
    cuts: list[tuple[int, str]] = []
    skipped: list[str] = []
    for name in targets:
        at = calls.get(name)
        if at is None:
            host = next((leaf for leaf in leaf_names if name.startswith(leaf + ".")), None)
            if host is not None:
                return f"norm {name} runs inside {host}, which the graph treats as one op"
            skipped.append(name)  # never called: nothing to measure, as per level
            continue
        if len(at) > 1:
            return f"norm {name} runs {len(at)} times per forward"
        cuts.append((at[0], name))
    cuts.sort()
    end = cuts[-1][0] + 1 if cuts else 0
    # Everything before the last cut runs (an unused in-place op may still feed a norm);
    # nothing after it does.
    kept = nodes[:end]
    position = {n: i for i, n in enumerate(kept)}
    last_use: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(kept):
        for inp in node.all_input_nodes:
            last_use[inp] = i
    free_after: list[list[torch.fx.Node]] = [[] for _ in kept]
    for node, i in last_use.items():
        if node in position:
            free_after[i].append(node)
    for node in kept:  # values nothing reads die at once
        if node not in last_use and node.op != "get_attr":
            free_after[position[node]].append(node)
    return FrontierPlan(root, kept, cuts, free_after, skipped)


# --------------------------------------------------------------------------- running


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensor_bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct storages of the tensors in ``values`` (views counted once)."""
    seen: set[tuple] = set()
    total = 0
    for leaf in torch.utils._pytree.tree_leaves(list(values)):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            key = (leaf.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


class _Slots:
    """Each batch's frontier, kept in memory while the budget allows, else in a file.

    A file is written with ``torch.save`` of the whole frontier at once, so tensors that share
    storage (views) still do after it is read back.
    """

    def __init__(self, budget_bytes: float, device: torch.device,
                 nodes: list[torch.fx.Node]) -> None:
        self.budget = budget_bytes
        self.device = device
        self.by_name = {n.name: n for n in nodes}  # files are keyed by node name
        self.memory: dict[int, dict] = {}
        self.sizes: dict[int, int] = {}
        self.in_memory = 0
        self.most_in_memory = 0
        self.dir: str | None = None
        self.spilled_bytes = 0

    def take(self, b: int) -> dict:
        if b in self.memory:
            self.in_memory -= self.sizes[b]
            return self.memory.pop(b)
        path = self._path(b)
        # Our own file, in a directory only this process can read (mkdtemp is 0700).
        named = torch.load(path, map_location=self.device, weights_only=False)
        os.unlink(path)
        return {self.by_name[k]: v for k, v in named.items()}

    def put(self, b: int, env: dict) -> int:
        size = _tensor_bytes(env.values())
        self.sizes[b] = size
        if self.in_memory + size <= self.budget:
            self.memory[b] = env
            self.in_memory += size
            self.most_in_memory = max(self.most_in_memory, self.in_memory)
        else:
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="varshift-exact-")
            torch.save({n.name: v for n, v in env.items()}, self._path(b))
            self.spilled_bytes += size
        return size

    def _path(self, b: int) -> str:
        assert self.dir is not None
        return os.path.join(self.dir, f"batch{b}.pt")

    def close(self) -> None:
        self.memory.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@dataclass(frozen=True)
class Feed:
    """What a frontier run reads.

    Attributes:
        batches: the calibration batches (read once).
        prepare: a batch -> the traced graph's first input.
        progress: ``progress(done, total_or_None)`` after each batch of each stage, or None.
        total: the number of batches, when known.
    """

    batches: Iterable[Any]
    prepare: Callable[[Any], torch.Tensor]
    progress: Callable[[int, "int | None"], None] | None = None
    total: int | None = None


def run(
    p: FrontierPlan,
    feed: Feed,
    write: Callable[[str, ChannelMoments, int], None],
    cache_mb: float,
    device: torch.device,
    model: nn.Module,
) -> FrontierRun:
    """Run the plan over ``feed``'s batches (read once), calling
    ``write(norm, moments, n_batches)`` at each cut. The model must already be in eval mode
    under ``no_grad``."""
    batches, prepare, progress, total = feed.batches, feed.prepare, feed.progress, feed.total
    nodes, cuts, free_after = p.nodes, p.cuts, p.free_after
    modules = dict(p.root.named_modules())
    consts: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    defaults = {n: n.args[0] for n in placeholders[1:]}
    slots = _Slots(cache_mb * MB, device, nodes)
    shapes: list[tuple[torch.Size, torch.dtype]] = []
    result = FrontierRun(batches=0, cuts=len(cuts), cache_mb=cache_mb)
    stages = max(len(cuts), 1)
    features = {name: modules[nodes[i].target].running_mean.numel() for i, name in cuts}

    def value(env: dict, n: torch.fx.Node) -> Any:
        return consts[n] if n in consts else env[n]

    def run_nodes(env: dict, b: int, start: int, stop: int) -> None:
        for i in range(start, stop):
            node = nodes[i]
            op = node.op
            if op == "placeholder":
                if node in defaults:
                    env[node] = defaults[node]
                continue  # the first one is set from the batch
            if op == "get_attr":
                if node not in consts:
                    consts[node] = _fetch_attr(p.root, str(node.target))
                continue
            if op == "output":  # never runs: the tail after the last cut is dropped
                continue
            env[node] = call(env, node, b)
            for dead in free_after[i]:
                env.pop(dead, None)

    def call(env: dict, node: torch.fx.Node, b: int) -> Any:
        args = torch.fx.node.map_arg(node.args, lambda n: value(env, n))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: value(env, n))
        try:
            if node.op == "call_module":
                return modules[node.target](*args, **kwargs)
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            return getattr(args[0], node.target)(*args[1:], **kwargs)  # call_method
        except DataError:
            raise
        except Exception as exc:  # the user's model rejected the batch
            shape, dtype = shapes[b]
            stand_in = torch.empty(shape, dtype=dtype, device="meta")
            raise fit_error(model, stand_in, exc,
                            where="DATA" if b == 0 else f"batch {b} of DATA") from exc

    def norm_input(env: dict, index: int) -> torch.Tensor:
        node = nodes[index]
        if node.args:
            return value(env, node.args[0])
        return value(env, next(iter(node.kwargs.values())))

    try:
        start = 0
        for k, (index, name) in enumerate(cuts):
            moments = ChannelMoments()
            cached = 0
            source = enumerate(batches) if k == 0 else ((b, None) for b in range(result.batches))
            for b, batch in source:
                if k == 0:
                    assert batch is not None
                    x = prepare(batch)
                    if x.untyped_storage().nbytes() > x.numel() * x.element_size():
                        # A slice of a larger tensor (a dataset): keeping (or spilling) it
                        # would keep (or write) all of that tensor.
                        x = x.clone()
                    shapes.append((x.shape, x.dtype))
                    env = {placeholders[0]: x}
                    del x, batch
                    result.batches += 1
                else:
                    env = slots.take(b)
                run_nodes(env, b, start, index)
                x = norm_input(env, index)
                if x.ndim < 2 or x.shape[1] != features[name]:
                    call(env, nodes[index], b)  # the norm raises what a forward would
                moments.add(x)
                del x
                cached += slots.put(b, env)
                del env
                if progress is not None:
                    done = k * result.batches + b + 1 if k else b + 1
                    progress(done, None if total is None else total * stages)
            result.peak_mb = max(result.peak_mb, cached / MB)
            if moments.mean is not None:
                write(name, moments, result.batches)
            start = index
        if not cuts:  # nothing to recalibrate in the graph: still count the data
            result.batches = sum(1 for _ in batches)
    finally:
        result.spilled_mb = slots.spilled_bytes / MB
        result.kept_mb = slots.most_in_memory / MB
        slots.close()
    return result
