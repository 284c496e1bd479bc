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
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn as nn

from .._torch_utils import check_materialized, copy_modes, replace_submodule
from ..errors import VarshiftError
from ..graph import Namer, fx_graph_module, fx_owner, kinds
from ..report.results import SwapEntry, SwapReport
from ..uout import Uout

if TYPE_CHECKING:
    from ..report.results import RegularizerEntry

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
    example_input: Any = None,
    call: Any = None,
    labels: str = "auto",
) -> tuple[nn.Module, SwapReport]:
    """Replace every active regularizer that reaches a norm with ``Uout(beta)``.

    Args:
        model: the model; untouched unless ``inplace=True`` (module swaps then happen in it).
        to: the replacement; only ``"uout"``.
        beta: Uout's noise half-width (variance factor ``1 + beta**2/3``).
        example_input: for models torch.fx cannot trace (their functional calls cannot be
            rewritten then, and are listed as skipped): a tensor or any calibration batch.
        call: ``fn(model, batch)`` that runs the model on ``example_input`` (see
            :mod:`varshift.calling`).

    Returns:
        ``(swapped_model, report)``. Eval-mode outputs are unchanged: both dropout and Uout
        are the identity at inference, and the norms keep their statistics until the model
        is fine-tuned or recalibrated.
    """
    from ..rules import scan

    if to not in TARGETS:
        raise VarshiftError(f"`to` {to!r} is not supported; choose one of: {', '.join(TARGETS)}")
    if not (isinstance(beta, (int, float)) and 0 < beta < 1):
        raise VarshiftError(f"`beta` must be in (0, 1), got {beta}")
    check_materialized(model)
    out = model if inplace else copy.deepcopy(model)
    found = scan(out, example_input, call=call, labels=labels)
    targets = [r for r in found.regularizers if r.active and r.reaches and not r.always_on]
    entries: list[SwapEntry] = []
    functional: list[RegularizerEntry] = []
    for reg in targets:
        if reg.type in kinds.ATTRIBUTE_REGULARIZERS:  # e.g. nn.MultiheadAttention(dropout=p)
            attr = kinds.ATTRIBUTE_REGULARIZERS[reg.type][0]
            entries.append(_entry(reg, False, beta, f"dropout inside torch's {reg.type} (its "
                                  f"`{attr}` argument): set it to 0 in the model's code"))
        elif reg.type in kinds.ARGUMENT_REGULARIZERS:  # attention's own dropout_p
            arg = kinds.ARGUMENT_REGULARIZERS[reg.type]
            entries.append(_entry(reg, False, beta, f"dropout inside {reg.type} (its `{arg}` "
                                  "argument): pass 0 in the model's code"))
        elif reg.kind == kinds.STOCHASTIC:  # found by what it does: no call to rewrite
            entries.append(_entry(reg, False, beta, "a random op written inline (found by what "
                                  "it does): replace it with varshift.Uout in the model's code"))
        elif reg.functional:
            functional.append(reg)
        else:
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


def _regularizer_calls(
    gm: torch.fx.GraphModule,
) -> list[tuple[torch.fx.Node, kinds.RegularizerInfo]]:
    """The functional regularizer calls of ``gm`` in graph order, with what they do."""
    calls = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not callable(node.target):
            continue
        info = kinds.regularizer_of_call(node.target, node.args, node.kwargs)
        if info is not None:
            calls.append((node, info))
    return calls


def _call_key(node: torch.fx.Node, info: kinds.RegularizerInfo) -> tuple:
    """What identifies a call in both traces: owner, op, p and the op that feeds it."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    feeder: str | None = None
    if isinstance(source, torch.fx.Node):
        feeder = source.op if source.op in ("placeholder", "get_attr") else (
            kinds.function_name(source.target) if source.op != "call_module" else str(source.target))
    return (fx_owner(node), kinds.function_name(node.target), info.p, feeder)


def _eval_call_names(model: nn.Module, gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """scan's names (``owner:op``, ``owner:op_1``, ...) for the calls in the eval-mode ``gm``.

    scan numbers the calls of the *training*-mode graph. A call that only happens in training
    (``if self.training: x = F.dropout(x, p)``) is missing from the eval graph, so numbering
    the eval graph on its own would shift every later name onto the wrong call. Each eval call
    takes the name of the next training call with the same key (owner, op, p, feeder), then,
    for calls whose feeder differs between the modes, of the next unclaimed call of the same
    owner and op.
    """
    namer = Namer()
    exact: dict[tuple, list[str]] = defaultdict(list)
    loose: dict[tuple, list[str]] = defaultdict(list)
    for node, info in _regularizer_calls(fx_graph_module(model, training=True)):
        key = _call_key(node, info)
        name = namer(key[0], key[1])
        exact[key].append(name)
        loose[key[:2]].append(name)
    names: dict[torch.fx.Node, str] = {}
    unmatched = []
    for node, info in _regularizer_calls(gm):
        key = _call_key(node, info)
        if exact[key]:
            names[node] = exact[key].pop(0)
            loose[key[:2]].remove(names[node])
        else:
            unmatched.append((node, key))
    for node, key in unmatched:
        if loose[key[:2]]:
            names[node] = loose[key[:2]].pop(0)
    return names


def _owner_training(model: nn.Module, owner: str) -> bool:
    """The ``training`` flag of the submodule ``owner`` (the model's when unknown)."""
    try:
        return model.get_submodule(owner).training if owner else model.training
    except AttributeError:
        return model.training


def _rewrite_functional(
    model: nn.Module, names: set[str], beta: float
) -> tuple[torch.fx.GraphModule, set[str]]:
    """Trace in eval mode; swap the named functional calls for Uout submodules."""
    gm = fx_graph_module(model, training=False)
    # The GraphModule's containers are new modules (training mode): take the model's modes, so
    # that an eval-mode model stays in eval mode everywhere, mixed modes included.
    copy_modes(model, gm, default=model.training)
    call_names = _eval_call_names(model, gm)
    done: set[str] = set()
    counter = 0
    for node, info in _regularizer_calls(gm):
        fn_name = kinds.function_name(node.target)
        name = call_names.get(node)
        if name in names:
            module: nn.Module = Uout(beta)
            done.add(name)
        elif info.training is False and (info.p or 0) > 0 and fn_name in MODULE_EQUIVALENT:
            module = MODULE_EQUIVALENT[fn_name](info.p)  # keeps acting when fine-tuning
        else:
            continue
        target = f"varshift_{'uout' if isinstance(module, Uout) else fn_name}_{counter}"
        counter += 1
        # A call inside ``owner.forward`` acts when ``owner`` is in training mode: so does the
        # module that replaces it.
        module.train(_owner_training(model, fx_owner(node)))
        gm.add_submodule(target, module)
        source = node.args[0] if node.args else node.kwargs.get("input")
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (source,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, done
