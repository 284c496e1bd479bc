"""Ground truth for ``varshift.scan``, found by running the model instead of reading its graph.

Nothing here uses varshift. The definition under test: a BatchNorm is *affected* by a
regularizer iff the BatchNorm's input changes when that regularizer is switched on, with every
other module (BatchNorms included) left in eval mode.

The experiments, all on one fixed input with the model in eval mode unless said otherwise:

1. **Which modules regularize.** Every module that is called is re-run *on its own*, on the
   input it received in the eval-mode baseline, with only its own ``training`` flag set
   (non-recursively; its children stay in eval mode). A module whose output then differs owns a
   regularizer: a regularizer module (``nn.Dropout``, ``StochasticDepth``, ``DropPath``,
   ``DropBlock2d``) or a module whose ``forward`` calls a functional one with
   ``training=self.training`` (DenseNet's ``_DenseLayer``). This costs one module call per
   module, not one forward pass.
2. **Reach.** For each such owner: the whole model with only the owner's flag set. The
   BatchNorms whose input changed are the owner's reach.
3. **Direct.** The same run, with every BatchNorm's *output* pinned to its eval-mode baseline
   (a forward hook). A change can then reach a BatchNorm's input only along a path that passes
   through no BatchNorm: the BatchNorms whose input still changes are the *direct* ones. (A
   regularizer that lives inside a BatchNorm, timm's ``BatchNormAct2d(drop_layer=...)``, acts
   on its host's output, so the host is not pinned in its run.)
4. **All on.** Every module except the BatchNorms in training mode at once: the BatchNorms whose
   input changed are the affected ones.

A random mask can leave a tensor unchanged by chance (a DropBlock on a small map may drop no
block, and timm's rescale ``numel / (sum + 1e-7)`` is then exactly 1.0 in float32). Step 1 tries
several seeds and keeps the first one under which the owner's output changes; step 2 and 3
reuse it. Since every other module is in eval mode and draws no random numbers, the owner sees
the same input and the same random stream in the whole-model run as in its solo run, so its
output changes there too.

BatchNorm weights, biases and running statistics are randomized first: timm and torchvision
initialize some BatchNorm weights to zero (``zero_init_last``), which would make a branch's
output constant and hide real dataflow from any numerical test.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

SEEDS = range(8)


def batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm (torch's ``_BatchNorm`` family, subclasses included), by qualified name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-degenerate affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in batch_norms(model).values():
            n = m.num_features
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if m.running_var is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _clone(obj: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, obj
    )


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(obj)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _same(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb)
    )


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[list]:
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def training_only(model: nn.Module, names: set[str]) -> Iterator[None]:
    """Eval mode everywhere, except ``m.training = True`` on the named modules (not their
    children). Restores every flag on exit."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for name, m in model.named_modules():
            if name in names:
                m.training = True
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def norm_inputs(
    model: nn.Module,
    x: torch.Tensor,
    train: set[str] = frozenset(),
    seed: int = 0,
    pin_norm_outputs: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """Run ``model`` on ``x`` with only ``train`` in training mode.

    Returns each BatchNorm's inputs and outputs, one per call. With ``pin_norm_outputs`` every
    BatchNorm named there returns (a copy of) that output instead of its own.
    """
    norms = batch_norms(model)
    pinned = pin_norm_outputs or {}
    ins: dict[str, list[torch.Tensor]] = {n: [] for n in norms}
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in norms}

    def pre(name):
        def hook(module, args):
            ins[name].append(args[0].detach().clone())

        return hook

    def post(name):
        def hook(module, args, output):
            k = len(outs[name])
            outs[name].append(output.detach().clone())
            if name in pinned:
                # a copy: later in-place ops (ReLU(inplace=True), x += ...) must not edit it
                return pinned[name][k].clone()
            return None

        return hook

    with _hooks([]) as handles, training_only(model, set(train)), torch.no_grad():
        for name, m in norms.items():
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        torch.manual_seed(seed)
        run(model, x)
    return ins, outs


def run(model: nn.Module, x: Any) -> Any:
    """``model(x)``; ``x`` may also be a dict of keyword arguments or ``fn(model)``."""
    if isinstance(x, dict):
        return model(**x)
    if callable(x) and not isinstance(x, torch.Tensor):
        return x(model)
    return model(x)


def changed(base: dict[str, list[torch.Tensor]], other: dict[str, list[torch.Tensor]]) -> set[str]:
    """The BatchNorms whose input differs between two runs (any call)."""
    return {name for name in base if not _same(base[name], other[name])}


def module_calls(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[tuple, dict, Any]]:
    """Each called module's (args, kwargs, output) at its first call, eval mode, copied when
    they are seen (so that later in-place ops do not edit them)."""
    seen: dict[str, tuple[tuple, dict, Any]] = {}
    pending: dict[str, tuple[tuple, dict]] = {}

    def pre(name):
        def hook(module, args, kwargs):
            if name not in seen and name not in pending:
                pending[name] = _clone((args, kwargs))

        return hook

    def post(name):
        def hook(module, args, kwargs, output):
            if name in pending:
                seen[name] = (*pending.pop(name), _clone(output))

        return hook

    with _hooks([]) as handles, training_only(model, set()), torch.no_grad():
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post(name), with_kwargs=True))
        run(model, x)
    return seen


def regularizer_owners(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Modules whose own training flag changes their output (experiment 1): name -> a seed
    under which it does. BatchNorms are skipped (their flag is the one we never touch).

    A module that draws no random numbers in its solo run is deterministic: one try settles
    it. Only one that draws random numbers and still returns its eval output is retried with
    the other seeds.
    """
    norms = set(batch_norms(model))
    modules = dict(model.named_modules())
    owners: dict[str, int] = {}
    for name, (args, kwargs, ref) in module_calls(model, x).items():
        if name in norms:
            continue
        m = modules[name]
        for seed in SEEDS:
            with training_only(model, {name}), torch.no_grad():
                torch.manual_seed(seed)
                before = torch.get_rng_state()
                out = m(*_clone(args), **_clone(kwargs))
                drew = not torch.equal(before, torch.get_rng_state())
            if not _same(ref, out):
                owners[name] = seed
                break
            if not drew:
                break
    return owners


@dataclass
class GroundTruth:
    """What running the model says. Names are ``named_modules()`` names."""

    norms: list[str]
    owners: dict[str, int]  # module whose own flag matters -> seed used
    reach: dict[str, set[str]] = field(default_factory=dict)  # owner -> BatchNorms it changes
    direct: dict[str, set[str]] = field(default_factory=dict)  # owner -> direct BatchNorms
    all_on: set[str] = field(default_factory=set)  # BatchNorms changed with everything on

    @property
    def affected(self) -> set[str]:
        return set().union(*self.reach.values()) if self.reach else set()

    @property
    def any_direct(self) -> set[str]:
        return set().union(*self.direct.values()) if self.direct else set()


def ground_truth(model: nn.Module, x: torch.Tensor) -> GroundTruth:
    """Run experiments 1-4 (see the module docstring) on ``model`` and input ``x``."""
    base_in, base_out = norm_inputs(model, x)
    owners = regularizer_owners(model, x)
    gt = GroundTruth(norms=list(base_in), owners=owners)
    for owner, seed in owners.items():
        ins, _ = norm_inputs(model, x, train={owner}, seed=seed)
        gt.reach[owner] = changed(base_in, ins)
        # A regularizer inside a norm (timm's BatchNormAct2d(drop_layer=...)) acts on that
        # norm's output: pinning its host would pin the regularizer away too.
        pins = {n: v for n, v in base_out.items() if not _inside(owner, n)}
        pinned, _ = norm_inputs(model, x, train={owner}, seed=seed, pin_norm_outputs=pins)
        gt.direct[owner] = changed(base_in, pinned)
    norms = set(base_in)
    everything = {n for n, _ in model.named_modules() if n not in norms}
    ins, _ = norm_inputs(model, x, train=everything, seed=0)
    gt.all_on = changed(base_in, ins)
    return gt


def _inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + ".") or ancestor == ""


def owner_of(regularizer_name: str) -> str:
    """The module that owns a scan regularizer: itself, or the ``owner`` of ``owner:op``."""
    return regularizer_name.split(":", 1)[0]
