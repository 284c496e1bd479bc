"""Swap the regularizers that reach a norm for Uout, the paper's variance-stable noise.

Module regularizers are replaced in place in a copy (one helper, ``replace_submodule``).
Functional ones (``F.dropout(x, p, self.training)`` inside a forward) can only be rewritten in a
torch.fx graph: the model is traced in eval mode (so inference behaves exactly as before) and
each such call becomes a call to a ``Uout`` submodule; the result is a ``GraphModule``. Other
functional dropouts in that graph become the equivalent ``nn.Dropout*`` modules so that they
still act when the model is fine-tuned. Whatever cannot be swapped is listed with the reason.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn as nn

from . import kinds
from ._torch_utils import replace_submodule
from .errors import VarshiftError
from .graph import _fx_owner, _Namer, fx_graph_module
from .reports import SwapEntry, SwapReport
from .uout import Uout

if TYPE_CHECKING:
    from .reports import RegularizerEntry

TARGETS = ("uout",)

#: Functional regularizers that have a module equivalent honouring ``self.training``.
MODULE_EQUIVALENT = {
    "dropout": nn.Dropout,
    "dropout_": nn.Dropout,
    "dropout1d": nn.Dropout1d,
    "dropout2d": nn.Dropout2d,
    "dropout3d": nn.Dropout3d,
    "alpha_dropout": nn.AlphaDropout,
    "feature_alpha_dropout": nn.FeatureAlphaDropout,
}


def swap(
    model: nn.Module,
    to: str = "uout",
    beta: float = 0.1,
    *,
    inplace: bool = False,
    example_input: torch.Tensor | None = None,
) -> tuple[nn.Module, SwapReport]:
    """Replace every active regularizer that reaches a norm with ``Uout(beta)``.

    Args:
        model: the model; untouched unless ``inplace=True`` (module swaps then happen in it).
        to: the replacement; only ``"uout"``.
        beta: Uout's noise half-width (variance factor ``1 + beta**2/3``).
        example_input: for models torch.fx cannot trace (their functional calls cannot be
            rewritten then, and are listed as skipped).

    Returns:
        ``(swapped_model, report)``. Eval-mode outputs are unchanged: both dropout and Uout
        are the identity at inference, and the norms keep their statistics until the model
        is fine-tuned or recalibrated.
    """
    from .rules import scan

    if to not in TARGETS:
        raise VarshiftError(f"--to {to!r} is not supported; choose one of: {', '.join(TARGETS)}")
    if not (isinstance(beta, (int, float)) and 0 < beta < 1):
        raise VarshiftError(f"--beta must be in (0, 1), got {beta}")
    out = model if inplace else copy.deepcopy(model)
    found = scan(out, example_input)
    targets = [r for r in found.regularizers if r.active and r.reaches and not r.always_on]
    entries: list[SwapEntry] = []
    functional: list[RegularizerEntry] = []
    for reg in targets:
        if reg.functional:
            functional.append(reg)
            continue
        replace_submodule(out, reg.name, Uout(beta))
        entries.append(_entry(reg, True, beta))

    result: nn.Module = out
    if functional:
        if found.traced_with != "fx":
            entries += [
                _entry(r, False, beta, "a functional call in a model torch.fx cannot trace: "
                       "replace it with varshift.Uout in the model's code") for r in functional
            ]
        else:
            result, done = _rewrite_functional(out, {r.name for r in functional}, beta)
            entries += [
                _entry(r, r.name in done, beta, None if r.name in done else
                       "not called in eval mode, so absent from the eval-mode graph")
                for r in functional
            ]
    report = SwapReport(
        model=type(model).__name__,
        to=to,
        beta=float(beta),
        entries=sorted(entries, key=lambda e: [r.name for r in targets].index(e.name)),
        graph_module=isinstance(result, torch.fx.GraphModule),
    )
    if report.graph_module:
        report.notes.append(
            "functional calls were rewritten in a torch.fx GraphModule traced in eval mode: "
            "inference is identical; Python control flow that depends on self.training now "
            "follows the eval branch also when fine-tuning"
        )
    return result, report


def _entry(reg: "RegularizerEntry", swapped: bool, beta: float, reason: str | None = None):
    return SwapEntry(
        name=reg.name, type=reg.type, kind=reg.kind, p=reg.p, swapped=swapped,
        replaced_with=f"Uout(beta={beta:g})" if swapped else None, reason=reason,
    )


def _rewrite_functional(
    model: nn.Module, names: set[str], beta: float
) -> tuple[torch.fx.GraphModule, set[str]]:
    """Trace in eval mode; swap the named functional calls for Uout submodules."""
    gm = fx_graph_module(model, training=False)
    gm.train(model.training)
    namer = _Namer()
    done: set[str] = set()
    counter = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        info = kinds.regularizer_of_call(node.target, node.args, node.kwargs) if callable(
            node.target) else None
        if info is None:
            continue
        name = namer(_fx_owner(node), kinds.function_name(node.target))
        fn_name = kinds.function_name(node.target)
        if name in names:
            module: nn.Module | None = Uout(beta)
            done.add(name)
        elif info.training is False and (info.p or 0) > 0 and fn_name in MODULE_EQUIVALENT:
            module = MODULE_EQUIVALENT[fn_name](info.p)  # keeps acting when fine-tuning
        else:
            continue
        target = f"varshift_{'uout' if isinstance(module, Uout) else fn_name}_{counter}"
        counter += 1
        gm.add_submodule(target, module)
        source = node.args[0] if node.args else node.kwargs.get("input")
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (source,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, done
