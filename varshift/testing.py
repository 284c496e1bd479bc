"""Assertions for your own test suite (pytest, unittest, or plain ``assert``-style scripts).

::

    from varshift.testing import assert_no_dropout_before_bn, assert_no_variance_shift

    def test_model_has_no_variance_shift():
        assert_no_variance_shift(model, calibration_batches, max_shift=1.05)

    def test_no_dropout_feeds_a_batchnorm():
        assert_no_dropout_before_bn(model)

Both raise :class:`AssertionError` with a table of the offending layers and the command that
fixes them; both return the report when they pass. Neither changes the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from .report.results import ProbeReport, ScanReport, severity_rank

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join(["  " + line(header), "  " + line(["-" * w for w in widths]),
                      *("  " + line(r) for r in rows)])


def assert_no_variance_shift(
    model: "nn.Module",
    batches: Iterable[Any],
    max_shift: float = 1.05,
    *,
    seed: int = 0,
    device: "str | torch.device | None" = None,
) -> ProbeReport:
    """Fail when any BatchNorm layer's measured variance shift exceeds ``max_shift``.

    Runs :func:`varshift.probe` on ``batches`` (tensors or ``(inputs, labels)`` pairs, the
    data the model will see at inference): the shift of a layer is ``max(r, 1/r)`` with
    ``r`` = eval-mode input variance / ``running_var`` (channel means). A layer passes when its
    shift is at most ``max_shift`` (default 1.05).

    Returns:
        The :class:`~varshift.reports.ProbeReport`, when every layer passes.

    Raises:
        AssertionError: a table of the layers above ``max_shift`` (shift, variances, the
            regularizers upstream) and how to fix them.
    """
    __tracebackhide__ = True  # pytest: show the message, not this frame
    from .measure.probing import probe

    if not max_shift >= 1.0:
        raise ValueError(f"max_shift must be a ratio >= 1.0, got {max_shift}")
    report = probe(model, batches, seed=seed, threshold=max_shift, device=device)
    bad = [l for l in report.layers if l.shift > max_shift]
    if not bad:
        return report
    rows = [[l.name, f"{l.shift:.3f}x", f"{l.running_var_mean:.4g}", f"{l.eval_var_mean:.4g}",
             f"{l.train_shift:.3f}x", ", ".join(l.reached_by) or "-"] for l in bad]
    caused = [l for l in bad if l.reached_by]
    fix = (
        "fix: recompute the BatchNorm statistics with dropout off: "
        "`fixed, report = varshift.recalibrate(model, batches, exact=True)`"
    )
    if not caused:
        fix = ("no regularizer reaches these layers: the batches may not look like the training "
               "data (check the data), or the model was trained on other statistics; " + fix)
    raise AssertionError(
        f"variance shift above {max_shift:g}x in {len(bad)} of {len(report.layers)} BatchNorm "
        f"layers of {report.model} ({report.samples} samples):\n"
        + _table(["layer", "shift", "running var", "eval var", "train/eval", "regularizer upstream"],
                 rows)
        + f"\n{fix}"
    )


def assert_no_dropout_before_bn(
    model: "nn.Module",
    example_input: "torch.Tensor | None" = None,
    *,
    fail_on: str = "warning",
) -> ScanReport:
    """Fail when an active dropout-like layer reaches a BatchNorm (a static check, no data).

    Runs :func:`varshift.scan`; fails on findings of severity ``fail_on`` (``warning``, the
    default, or ``error``) or worse. ``example_input`` is needed only for models torch.fx
    cannot trace. Findings of severity ``info`` (Uout, whose shift is negligible) pass.

    Returns:
        The :class:`~varshift.reports.ScanReport`, when nothing reaches ``fail_on``.

    Raises:
        AssertionError: a table of the regularizers, the BatchNorm layers they feed, their
            predicted shifts and source lines, and the remedy.
    """
    __tracebackhide__ = True
    from .rules import scan

    if fail_on not in ("warning", "error"):
        raise ValueError(f"fail_on must be 'warning' or 'error', got {fail_on!r}")
    report = scan(model, example_input)
    bad = [f for f in report.findings if severity_rank(f.severity) >= severity_rank(fail_on)]
    if not bad:
        return report
    rows = []
    for f in bad:
        where = str(f.source) if f.source else (f"created at {f.defined_at}" if f.defined_at else "-")
        shift = f"~{f.predicted_shift:.3g}x" if f.predicted_shift is not None else "-"
        rows.append([f.regularizer, f.severity, ", ".join(f.direct) or "-", shift, where])
    remedies = sorted({f.remedy for f in bad})
    raise AssertionError(
        f"{report.verdict} ({report.model}):\n"
        + _table(["regularizer", "severity", "feeds", "predicted shift", "source"], rows)
        + "\nfix: " + "\nfix: ".join(remedies)
    )
