"""Graph rules: from a dataflow graph to findings. Pure functions of the graph."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..catalog import RULES as RULES
from ..graph import BATCH_STATS_NORM, FUNCTION, NORM, REGULARIZER, Behaviour, DataflowGraph, Op, kinds, trace
from ..report.results import Finding, NormEntry, RegularizerEntry, ScanReport, plural, severity_rank

if TYPE_CHECKING:
    import torch.nn as nn

# RULES (rule id -> what it means) lives in the leaf varshift.catalog, so that the reports
# can describe the rules without importing this stage; it is re-exported here.

#: Severity of ``regularizer-before-norm`` by predicted shift: the first threshold reached.
SEVERITY_BY_SHIFT = ((1.10, "error"), (1.01, "warning"), (0.0, "info"))

#: Kinds whose zero-mean estimate understates the risk get at least this severity.
MIN_SEVERITY = {kinds.ALPHA_DROPOUT: "warning"}

_MOVABLE = (kinds.DROPOUT, kinds.CHANNEL_DROPOUT, kinds.ALPHA_DROPOUT)


def scan(model: "nn.Module", example_input: Any = None, *, call: Any = None,
         labels: str = "auto", fail_on: str = "error") -> ScanReport:
    """Find every regularizer that reaches a BatchNorm in ``model``'s dataflow graph.

    Traces with torch.fx; when fx cannot trace the model, runs it once on ``example_input``
    (required then) and records the ops. The model's parameters, buffers and modes are left
    as they were.

    ``example_input`` is a tensor, or any calibration batch (a tuple of positional inputs, a
    dict of keyword arguments, ...), called by the rules of :mod:`varshift.calling` or by
    ``call(model, batch)`` when given (a callable or a ``pkg.module:fn`` string).

    ``fail_on`` is the severity at which ``bool(report)`` turns False: ``error`` (the
    default), ``warning`` or ``never``.

    Returns:
        A :class:`ScanReport`; ``bool(report)`` is False when a finding reaches ``fail_on``.

    Raises:
        TraceError: fx cannot trace the model and no example input was given, or the model
            does not run on the example input.
    """
    import torch

    from ..calling import Caller, Invocation
    from ..options import FailOn, choice

    gate = choice(FailOn, fail_on, "fail_on")
    if example_input is not None and not isinstance(example_input, Invocation) and (
            call is not None or not isinstance(example_input, torch.Tensor)
            or not example_input.is_floating_point()):
        # one sample is enough to trace; a `call` function gets the whole batch it expects
        limit = None if call is not None else 1
        example_input = Caller(model, call=call, labels=labels).prepare(example_input, limit=limit)
    report, graph = scan_traced(model, example_input)
    if isinstance(example_input, torch.Tensor) and graph.traced_with != "dynamic":
        from ..io.inputs import check_example

        check_example(model, example_input)  # fx traced without running it
    return dataclasses.replace(report, fail_on=gate)


def scan_for(model: "nn.Module", x: Any) -> tuple[ScanReport, DataflowGraph]:
    """:func:`scan_traced` for the estimators: traces dynamically on ``x`` (a tensor is cut
    to ``x[:1]``; an :class:`~varshift.calling.Invocation` runs whole) if fx cannot; errors
    name the data."""
    import torch

    from ..errors import TraceError
    from ..io.inputs import fit_error

    try:
        return scan_traced(model, x[:1] if isinstance(x, torch.Tensor) else x)
    except TraceError as exc:
        raise fit_error(model, x, exc.__cause__ or exc) from exc


def scan_traced(
    model: "nn.Module", example_input: Any = None
) -> tuple[ScanReport, DataflowGraph]:
    """:func:`scan`, also returning the dataflow graph it traced (for passes that need it).
    ``example_input``: None, a tensor or a :class:`~varshift.calling.Invocation`."""
    from ..calling import describe

    graph = trace(model, example_input)
    frozen = {name for name, m in model.named_modules() if kinds.is_frozen_norm(m)}
    report = scan_graph(graph, type(model).__name__, frozen)
    _mark_frozen(model, report)
    if graph.idle_random:
        report.notes.append(
            f"random draws that never reach the data path (not regularizers): "
            f"{', '.join(graph.idle_random[:5])}"
        )
    if graph.traced_with == "dynamic" and example_input is not None:
        what = (f"an input of shape {tuple(example_input.shape)}"
                if hasattr(example_input, "shape") else f"the batch {describe(example_input)}")
        report.notes.append(
            "torch.fx could not trace this model; it was traced by running it once on "
            f"{what} (branches not taken then are not seen)"
        )
    return report, graph


def _mark_frozen(model: "nn.Module", report: ScanReport) -> None:
    """Flag the norms whose statistics training never updates, and say what that means."""
    frozen = []
    for entry in report.norms:
        try:
            module = model.get_submodule(entry.name) if entry.name else model
        except AttributeError:
            continue
        entry.frozen = kinds.is_frozen_norm(module)
        if entry.frozen:
            frozen.append(entry)
    if frozen:
        types = sorted({e.type for e in frozen})
        report.notes.append(
            f"{plural(len(frozen), 'frozen BatchNorm layer')} ({', '.join(types)}): training never "
            "updates their statistics, so dropout cannot have shifted them; recalibrated only "
            "with `all_norms=True` or `include_frozen=True`"
        )


def _grouped(ops: list[Op]) -> dict[str, list[Op]]:
    """Ops by name, in order of first execution (a shared module is called more than once)."""
    out: dict[str, list[Op]] = {}
    for op in ops:
        out.setdefault(op.name, []).append(op)
    return out


def _type_name(op: Op) -> str:
    """What a report calls an op's type: its class or function name; for a regularizer found
    by what it does, the op and where it is called (``mul at blocks.py:12 in drop_connect``),
    or ``random control flow``."""
    if op.behaviour is Behaviour.RANDOM_CONTROL_FLOW:
        return "random control flow"
    if op.behaviour is Behaviour.RANDOM_OPERAND and op.source is not None:
        import os

        src = op.source
        return (f"{op.target} at {os.path.basename(src.file)}:{src.line}"
                + (f" in {src.function}" if src.function else ""))
    return op.target


def _is_active(op: Op) -> bool:
    reg = op.reg
    assert reg is not None
    if op.kind == FUNCTION and reg.training is False:
        return False
    return reg.p is None or reg.p > 0


def scan_graph(graph: DataflowGraph, model_name: str = "model",
               frozen: "set[str] | frozenset[str]" = frozenset()) -> ScanReport:
    """Apply the rules to a dataflow graph. Norms named in ``frozen`` (statistics that training
    never updates) are listed but never affected: dropout cannot have shifted them."""
    reg_groups = _grouped([op for op in graph.ops if op.role == REGULARIZER])
    norm_groups = _grouped([op for op in graph.ops if op.role == NORM])
    norm_order = {name: i for i, name in enumerate(norm_groups)}
    always_on = {op.name for op in graph.always_on}
    last_norm = next(reversed(norm_groups), None)

    def names(indices: set[int]) -> list[str]:
        found = {graph.ops[i].name for i in indices} - set(frozen)
        return sorted(found, key=norm_order.__getitem__)

    regularizers: list[RegularizerEntry] = []
    findings: list[Finding] = []
    reached_by: dict[str, list[str]] = {name: [] for name in norm_groups}
    direct_norms: set[str] = set()

    for name, ops in reg_groups.items():
        first = ops[0]
        assert first.reg is not None  # ops of regularizers carry their info
        reaches = names({i for op in ops for i in graph.downstream(op.index)})
        direct = names({i for op in ops for i in graph.downstream(op.index, stop_at_norms=True)})
        is_always_on = name in always_on
        active = any(_is_active(op) for op in ops)
        entry = RegularizerEntry(
            name=name,
            kind=first.reg.kind,
            type=_type_name(first),
            p=first.reg.p,
            active=active,
            functional=first.kind == FUNCTION,
            reaches=reaches,
            always_on=is_always_on,
            source=first.source,
            defined_at=first.defined_at,
        )
        regularizers.append(entry)
        if is_always_on:
            findings.append(_inference_finding(entry, direct))
            continue
        if not active or not reaches:
            continue
        for norm in reaches:
            reached_by[norm].append(name)
        direct_norms.update(direct)
        findings.append(_shift_finding(entry, direct, len(reaches), last_norm))

    # Always-on calls seen only in the eval-mode trace (a branch train mode does not take).
    seen = {r.name for r in regularizers}
    for op in graph.always_on:
        if op.name not in seen:
            assert op.reg is not None
            entry = RegularizerEntry(op.name, op.reg.kind, _type_name(op), op.reg.p, True, True, [], True,
                                     op.source, op.defined_at)
            regularizers.append(entry)
            findings.append(_inference_finding(entry, []))

    norms = [
        NormEntry(
            name=name,
            type=ops[0].target,
            affected=bool(reached_by[name]),
            direct=name in direct_norms,
            reached_by=reached_by[name],
            source=ops[0].source,
            defined_at=ops[0].defined_at,
        )
        for name, ops in norm_groups.items()
    ]
    findings += _batch_stats_findings(graph)
    return ScanReport(model_name, graph.traced_with, regularizers, norms, findings)


def _batch_stats_findings(graph: DataflowGraph) -> list[Finding]:
    """One finding per BatchNorm without running statistics."""
    out = []
    for name, ops in _grouped([op for op in graph.ops if op.role == BATCH_STATS_NORM]).items():
        out.append(Finding(
            rule="norm-without-running-stats",
            severity="warning",
            regularizer=name,
            direct=[name],
            downstream_count=len(graph.downstream(ops[0].index)),
            predicted_shift=None,
            remedy="train with track_running_stats=True (then "
                   "`varshift.recalibrate(all_norms=True)` can fill its statistics), or use "
                   "GroupNorm/LayerNorm",
            message=f"{name or '(root)'} [{ops[0].target}(track_running_stats=False)] normalizes "
                    "with batch statistics at inference: outputs depend on the batch",
        ))
    return out


def _severity(kind: str, shift: float | None) -> str:
    if shift is None:
        severity = "warning"
    else:
        severity = next(sev for threshold, sev in SEVERITY_BY_SHIFT if shift >= threshold)
    floor = MIN_SEVERITY.get(kind, "info")
    return max(severity, floor, key=severity_rank)


def _shift_finding(
    reg: RegularizerEntry, direct: list[str], downstream: int, last_norm: str | None
) -> Finding:
    shift = kinds.predicted_shift(reg.kind, reg.p)
    what = f"{reg.type}(p={reg.p:g})" if reg.p is not None else reg.type
    if reg.kind == kinds.UOUT:
        what = f"Uout(beta={reg.p:g})"
    estimate = (
        f"predicted shift ~{shift:.3g}x (zero-mean estimate)" if shift is not None else
        "shift cannot be predicted (p unknown)"
    )
    more = downstream - len(direct)
    further = f" and {plural(more, 'more BatchNorm layer')} downstream" if more > 0 else ""
    message = f"{reg.name} [{what}] feeds {', '.join(direct)}{further}: {estimate}"
    if reg.kind == kinds.UOUT:
        remedy = "none needed: Uout is the variance-stable choice (recalibrate if it matters)"
    elif reg.kind in _MOVABLE:
        remedy = (
            "`varshift.recalibrate(exact=True)`; or `varshift.swap` to Uout and fine-tune; or "
            f"move it after the last BatchNorm ({last_norm})"
        )
    else:
        remedy = (
            "`varshift.recalibrate(exact=True)`; or `varshift.swap` to Uout and fine-tune "
            f"({reg.kind.replace('_', '-')} cannot move after the last BatchNorm)"
        )
    if reg.kind == kinds.ALPHA_DROPOUT:
        message += "; AlphaDropout keeps the variance only for standardized SELU inputs"
    return Finding(
        rule="regularizer-before-norm",
        severity=_severity(reg.kind, shift),
        regularizer=reg.name,
        direct=direct,
        downstream_count=downstream,
        predicted_shift=shift,
        remedy=remedy,
        message=message,
        source=reg.source,
        defined_at=reg.defined_at,
    )


def _inference_remedy(reg: RegularizerEntry) -> str:
    if reg.kind == kinds.STOCHASTIC:
        return "draw the random values only when self.training is True (noise at inference)"
    if reg.type == "scaled_dot_product_attention":
        return "pass dropout_p=0.0 when not self.training"
    return f"pass training=self.training to {reg.type}() so it is off in eval mode"


def _inference_finding(reg: RegularizerEntry, direct: list[str]) -> Finding:
    return Finding(
        rule="dropout-at-inference",
        severity="error",
        regularizer=reg.name,
        direct=direct,
        downstream_count=len(reg.reaches),
        predicted_shift=None,
        remedy=_inference_remedy(reg),
        message=f"{reg.name} [{reg.type}{'' if reg.p is None else f'(p={reg.p:g})'}] is active "
        "in eval mode: every inference is random",
        source=reg.source,
        defined_at=reg.defined_at,
    )
