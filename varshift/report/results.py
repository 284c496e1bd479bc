"""Result objects. Pure data: the passes fill them, ``render`` displays them.

Each report has ``to_dict()`` (the stable JSON documented in docs/json.md and varshift/schemas/, with ``schema`` and
``varshift_version``) and answers "passed?" with ``__bool__``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .._types import SourceLocation
from .._version import __version__

SEVERITIES = ("info", "warning", "error")  # in increasing order


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 layer"``, ``"2 layers"``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists, floats rounded to 6 figures."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _document(schema: str, body: dict) -> dict:
    return _clean({"schema": schema, "varshift_version": __version__, **body})


# --------------------------------------------------------------------------- scan


@dataclass
class RegularizerEntry:
    """A regularizer in the model (a module, or a functional call named ``owner:op``).

    ``source`` is the line that calls it (None when unknown, e.g. a pickle whose source is
    gone, or a call inside torch's own containers); ``defined_at`` the line that created the
    module, when knowable.
    """

    name: str
    kind: str
    type: str
    p: float | None
    active: bool
    functional: bool
    reaches: list[str]
    always_on: bool = False
    source: SourceLocation | None = None
    defined_at: SourceLocation | None = None


@dataclass
class NormEntry:
    """A norm (BatchNorm-family layer) and the active regularizers upstream of it."""

    name: str
    type: str
    affected: bool
    direct: bool
    reached_by: list[str]
    source: SourceLocation | None = None
    defined_at: SourceLocation | None = None
    #: training never updates its statistics (FrozenBatchNorm2d, momentum=0): recalibrated
    #: only with ``all_norms`` or ``include_frozen``
    frozen: bool = False


@dataclass
class Finding:
    """One rule that fired, with what to do about it.

    ``source`` / ``defined_at``: the regularizer's (see :class:`RegularizerEntry`); the norms'
    are in :attr:`ScanReport.norms`.
    """

    rule: str
    severity: str
    regularizer: str
    direct: list[str]
    downstream_count: int
    predicted_shift: float | None
    remedy: str
    message: str
    source: SourceLocation | None = None
    defined_at: SourceLocation | None = None


@dataclass
class ScanReport:
    """What ``varshift.scan`` found in a model's dataflow graph.

    ``bool(report)`` is True when no finding reaches the severity ``fail_on`` (default
    ``error``; ``warning``; ``never``: always True).
    """

    model: str
    traced_with: str
    regularizers: list[RegularizerEntry]
    norms: list[NormEntry]
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    fail_on: str = "error"

    schema = "varshift.scan/1"

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def regularizer(self, name: str) -> RegularizerEntry | None:
        """The regularizer entry named ``name``, or None."""
        return next((r for r in self.regularizers if r.name == name), None)

    def norm(self, name: str) -> NormEntry | None:
        """The norm entry named ``name``, or None."""
        return next((n for n in self.norms if n.name == name), None)

    def failed(self, fail_on: str | None = None) -> bool:
        """True when a finding reaches ``fail_on`` (default: the report's own ``fail_on``;
        ``error``, ``warning``; ``never``: False)."""
        fail_on = self.fail_on if fail_on is None else fail_on
        if fail_on == "never":
            return False
        return any(severity_rank(f.severity) >= severity_rank(fail_on) for f in self.findings)

    def __bool__(self) -> bool:
        return not self.failed()

    @property
    def verdict(self) -> str:
        affected = [n for n in self.norms if n.affected]
        active = [r for r in self.regularizers if r.active]
        shifts = [f.predicted_shift for f in self.findings if f.predicted_shift is not None]
        if not self.findings:
            if not self.norms:
                return f"clean: no BatchNorm layers ({plural(len(self.regularizers), 'regularizer')})"
            return (
                f"clean: no active regularizer reaches a BatchNorm ({len(active)} active "
                f"of {plural(len(self.regularizers), 'regularizer')}, "
                f"{plural(len(self.norms), 'BatchNorm layer')})"
            )
        parts = []
        # info findings (Uout, tiny p) predict a negligible shift: not "shifting"
        shifting = [f for f in self.findings
                    if f.rule == "regularizer-before-norm" and f.severity != "info"]
        negligible = [f for f in self.findings
                      if f.rule == "regularizer-before-norm" and f.severity == "info"]
        if shifting:
            worst = f", worst predicted shift {max(shifts):.2f}x" if shifts else ""
            parts.append(
                f"{plural(len(shifting), 'regularizer')} "
                f"{'shifts' if len(shifting) == 1 else 'shift'} the statistics of "
                f"{len(affected)} of {plural(len(self.norms), 'BatchNorm layer')}{worst}"
            )
        if negligible:
            parts.append(
                f"{plural(len(negligible), 'regularizer')} "
                f"{'reaches' if len(negligible) == 1 else 'reach'} a BatchNorm with a negligible "
                "predicted shift (info)"
            )
        random = [f for f in self.findings if f.rule == "dropout-at-inference"]
        if random:
            parts.append(
                f"{plural(len(random), 'dropout call')} "
                f"{'stays' if len(random) == 1 else 'stay'} active at inference"
            )
        batch = [f for f in self.findings if f.rule == "norm-without-running-stats"]
        if batch:
            parts.append(
                f"{plural(len(batch), 'BatchNorm layer')} without running statistics "
                f"{'normalizes' if len(batch) == 1 else 'normalize'} with batch statistics "
                "at inference"
            )
        return "; ".join(parts)

    @property
    def summary(self) -> dict:
        return {
            "regularizers": len(self.regularizers),
            "active_regularizers": sum(r.active for r in self.regularizers),
            "norms": len(self.norms),
            "affected_norms": sum(n.affected for n in self.norms),
            "findings": len(self.findings),
            "errors": self.count("error"),
            "warnings": self.count("warning"),
            "infos": self.count("info"),
            "traced_with": self.traced_with,
            "fail_on": self.fail_on,
            "passed": bool(self),
            "verdict": self.verdict,
        }

    def to_dict(self) -> dict:
        return _document(
            self.schema,
            {
                "model": self.model,
                "source": self.source,
                "regularizers": [dataclasses.asdict(r) for r in self.regularizers],
                "norms": [dataclasses.asdict(n) for n in self.norms],
                "findings": [dataclasses.asdict(f) for f in self.findings],
                "notes": list(self.notes),
                "summary": self.summary,
            },
        )


# --------------------------------------------------------------------------- probe


@dataclass
class LayerShift:
    """Measured statistics of one norm's input (docs/concepts.md).

    Variances are channel means (``mean_c``) of per-channel population variances; ``shift``
    is ``max(r, 1/r)`` with ``r = eval_var_mean / running_var_mean``; ``train_shift`` compares
    the train-mode variance with the eval one (the part the regularizers cause); the channel
    shifts use ``(eval_var + eps) / (running_var + eps)`` per channel, ``eps`` the norm's own.
    ``mean_offset`` is the channel mean of ``|eval_mean - running_mean| / sqrt(running_var + eps)``.
    """

    name: str
    type: str
    affected: bool | None
    reached_by: list[str]
    channels: int
    running_var_mean: float
    eval_var_mean: float
    train_var_mean: float
    shift: float
    train_shift: float
    channel_shift_median: float
    channel_shift_max: float
    running_mean_mean: float
    eval_mean_mean: float
    train_mean_mean: float
    mean_offset: float
    calls: int = 1


@dataclass
class ProbeReport:
    """What ``varshift.probe`` measured, layer by layer in execution order.

    ``bool(report)`` is True when no layer's shift reaches ``threshold``.
    """

    model: str
    layers: list[LayerShift]
    samples: int
    batches: int
    seed: int
    threshold: float
    traced_with: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    data: str | None = None
    regularizer_kinds: dict[str, str] = field(default_factory=dict)  # name -> kind (scan's)

    schema = "varshift.probe/1"

    @property
    def worst(self) -> LayerShift | None:
        return max(self.layers, key=lambda l: l.shift, default=None)

    def above(self, threshold: float | None = None) -> list[LayerShift]:
        t = self.threshold if threshold is None else threshold
        return [l for l in self.layers if l.shift >= t]

    def failed(self, threshold: float | None = None) -> bool:
        return bool(self.above(threshold))

    def __bool__(self) -> bool:
        return not self.failed()

    @property
    def verdict(self) -> str:
        worst = self.worst
        if worst is None:
            return "no BatchNorm layers: nothing to measure"
        above = self.above()
        head = (
            f"{len(above)} of {plural(len(self.layers), 'BatchNorm layer')} at or above "
            f"{self.threshold:g}x; worst {worst.shift:.3f}x at {worst.name}"
            if above
            else f"no BatchNorm layer reaches {self.threshold:g}x (worst {worst.shift:.3f}x at "
            f"{worst.name})"
        )
        if not above:
            return head
        explained = worst.train_shift >= 1 + 0.5 * (worst.shift - 1)
        if worst.affected and explained:
            cause = (
                f"the train-mode pass reproduces it ({worst.train_shift:.3f}x): dropout upstream "
                f"({', '.join(worst.reached_by[:2]) or 'a regularizer'}) is the cause"
            )
        elif worst.affected and worst.reached_by and all(
                self.regularizer_kinds.get(r) == "uout" for r in worst.reached_by):
            # Uout barely changes the variance: the statistics were recorded under another
            # regularizer, i.e. dropout was swapped for Uout and the BatchNorms kept its numbers
            cause = (
                f"the train-mode pass explains only {worst.train_shift:.3f}x of it: Uout upstream "
                f"({', '.join(worst.reached_by[:2])}) barely changes the variance, so the running "
                "statistics were recorded under the regularizer it replaced; recalibrate "
                "(varshift recalibrate) or fine-tune the swapped model"
            )
        elif worst.affected:
            cause = (
                f"the train-mode pass explains only {worst.train_shift:.3f}x of it: the "
                "calibration data may differ from the training data"
            )
        else:
            cause = "no regularizer reaches it: the calibration data may differ from the training data"
        return f"{head}; {cause}"

    @property
    def summary(self) -> dict:
        worst = self.worst
        return {
            "max_shift": worst.shift if worst else 1.0,
            "worst_layer": worst.name if worst else None,
            "samples": self.samples,
            "batches": self.batches,
            "layers": len(self.layers),
            "affected_layers": sum(bool(l.affected) for l in self.layers),
            "threshold": self.threshold,
            "layers_above_threshold": len(self.above()),
            "passed": bool(self),
            "verdict": self.verdict,
        }

    def to_dict(self) -> dict:
        return _document(
            self.schema,
            {
                "model": self.model,
                "source": self.source,
                "data": self.data,
                "seed": self.seed,
                "traced_with": self.traced_with,
                "layers": [dataclasses.asdict(l) for l in self.layers],
                "warnings": list(self.warnings),
                "notes": list(self.notes),
                "summary": self.summary,
            },
        )


# --------------------------------------------------------------------------- export


@dataclass
class ParityCheck:
    """One onnxruntime-versus-PyTorch comparison on one batch of inputs.

    ``max_abs_diff`` and ``max_rel_diff`` are over all elements of all outputs (see
    :class:`ParityResult`); ``error`` says why the file could not be run (then ``passed`` is
    False and the differences are infinite).
    """

    label: str
    batch_size: int
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    error: str | None = None


@dataclass
class ParityResult:
    """An exported ONNX file and how closely onnxruntime reproduces the PyTorch model.

    ``passed`` (and ``bool(result)``) is True when every element of every output of every
    check is within ``atol + rtol * |torch|`` of the PyTorch value (``numpy.allclose``).
    ``max_abs_diff`` is the largest ``|onnx - torch|``; ``max_rel_diff`` the largest
    ``|onnx - torch| / max(|torch|, 1e-6 * max|torch of that output|)``: the floor keeps
    elements that are (nearly) zero in the reference from making the ratio meaningless.
    Both are infinite (``null`` in JSON) when a check could not run.

    JSON (``varshift.export/1``): ``output``, ``max_abs_diff``, ``max_rel_diff``, ``passed``,
    ``atol``, ``rtol``, ``batch_sizes``, ``outputs`` (number of output tensors), ``opset``,
    ``exporter`` (``torch.export`` or ``torchscript``), ``file_size`` (bytes), ``model``,
    ``source``, ``checks`` (``[{label, batch_size, max_abs_diff, max_rel_diff, passed,
    error}]``) and ``notes``.
    """

    output: str
    model: str
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    atol: float
    rtol: float
    batch_sizes: list[int]
    outputs: int
    opset: int | None
    exporter: str | None
    file_size: int
    checks: list[ParityCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str | None = None

    schema = "varshift.export/1"

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return _document(
            self.schema,
            {
                "output": self.output,
                "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff,
                "passed": self.passed,
                "atol": self.atol,
                "rtol": self.rtol,
                "batch_sizes": list(self.batch_sizes),
                "outputs": self.outputs,
                "opset": self.opset,
                "exporter": self.exporter,
                "file_size": self.file_size,
                "model": self.model,
                "source": self.source,
                "checks": [dataclasses.asdict(c) for c in self.checks],
                "notes": list(self.notes),
            },
        )


# --------------------------------------------------------------------------- recalibrate


@dataclass
class LayerFix:
    """One norm before and after recalibration (shifts measured on the calibration data)."""

    name: str
    type: str
    recalibrated: bool
    shift_before: float
    shift_after: float
    running_var_before: float
    running_var_after: float
    running_mean_before: float
    running_mean_after: float


@dataclass
class Metrics:
    """Accuracy and mean negative log-likelihood (cross-entropy of the outputs as logits)."""

    accuracy: float
    nll: float
    samples: int
    held_out: bool


@dataclass
class ExactInfo:
    """Which path the exact estimator took, and why.

    Attributes:
        path: ``frontier`` (one pass over the data, cut before each norm on the fx graph) or
            ``levels`` (one pass per dependency level).
        reason: why ``levels`` ran (None for ``frontier``).
        cuts: frontier cuts made (one per recalibrated norm that runs).
        cache_mb: the memory budget for the activations kept at a cut (MiB).
        peak_mb: the largest total of those activations over all batches at one cut (MiB).
        kept_mb: the most of them held in memory at once (MiB; within ``cache_mb``).
        spilled_mb: how much of it went to a temporary directory because it did not fit (MiB).
        default_budget: ``cache_mb`` was the default (half the available memory, which
            depends on the machine), not given by the caller.
    """

    path: str
    reason: str | None = None
    cuts: int | None = None
    cache_mb: float | None = None
    peak_mb: float | None = None
    kept_mb: float | None = None
    spilled_mb: float | None = None
    default_budget: bool = False

    def note(self) -> str:
        """One line for the report's notes."""
        if self.path == "levels":
            return f"exact estimator: one pass per dependency level, because {self.reason}"
        cache_mb = self.cache_mb or 0.0
        budget = f"{cache_mb:.0f}" if cache_mb >= 10 else f"{cache_mb:g}"
        # the default depends on the machine's free memory: the text (which README examples
        # and CI logs show) says which budget without the machine's number
        within = ("within the default budget, half the available memory" if self.default_budget
                  else f"`cache_mb={budget}`")
        text = (f"exact estimator: one pass over the data, cut before each of {self.cuts} "
                f"norms on the torch.fx graph; activations kept at a cut: at most "
                f"{self.peak_mb:.1f} MiB ({within})")
        if self.spilled_mb:
            text += (f"; over the budget, {self.spilled_mb:.1f} MiB went through a temporary "
                     "directory (slower; raise `cache_mb` to avoid it)")
        return text


@dataclass
class RecalibrationReport:
    """What ``varshift.recalibrate`` changed, and what it did to the shifts and metrics.

    ``bool(report)`` is True when no recalibrated layer's shift afterwards reaches
    ``threshold``, accuracy did not fall by more than ``max_accuracy_drop`` percentage points
    (when set and labels were given), and the ONNX check (when run) passed.
    """

    model: str
    estimator: str  # "population" or "exact"
    layers: list[LayerFix]
    before: Metrics | None
    after: Metrics | None
    passes: int
    batches: int
    samples: int
    threshold: float = 1.1
    output: str | None = None
    onnx: Any = None  # a ParityResult when ``onnx`` was given
    max_accuracy_drop: float | None = None  # percentage points; None: no accuracy guard
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: str | None = None
    data: str | None = None
    eval_data: str | None = None
    exact: ExactInfo | None = None  # the exact estimator's path (None for population)

    schema = "varshift.recalibrate/1"

    @property
    def recalibrated(self) -> list[LayerFix]:
        return [l for l in self.layers if l.recalibrated]

    def __bool__(self) -> bool:
        shifts = [l.shift_after for l in self.recalibrated if l.shift_after == l.shift_after]
        ok = all(s < self.threshold for s in shifts)
        return ok and not self.accuracy_dropped and (self.onnx is None or bool(self.onnx))

    @property
    def accuracy_drop(self) -> float | None:
        """Accuracy before minus after, in percentage points (None without labels)."""
        if self.before is None or self.after is None:
            return None
        return 100.0 * (self.before.accuracy - self.after.accuracy)

    @property
    def accuracy_dropped(self) -> bool:
        """True when ``max_accuracy_drop`` is set and the accuracy fell by more."""
        drop = self.accuracy_drop
        # 1e-9: accuracies are ratios of counts; do not fail on float noise at the limit
        return self.max_accuracy_drop is not None and drop is not None and (
            drop > self.max_accuracy_drop + 1e-9)

    @property
    def verdict(self) -> str:
        fixed = self.recalibrated
        if not fixed:
            return "nothing recalibrated: no BatchNorm layer is reached by an active regularizer"
        worst_b = max(fixed, key=lambda l: l.shift_before)
        worst_a = max(fixed, key=lambda l: l.shift_after)
        text = (
            f"recalibrated {plural(len(fixed), 'BatchNorm layer')} ({self.estimator}): worst shift "
            f"{worst_b.shift_before:.3f}x -> {worst_a.shift_after:.3f}x"
        )
        if self.before is not None and self.after is not None:
            where = "held-out" if self.after.held_out else "calibration"
            text += (
                f"; {where} NLL {self.before.nll:.4f} -> {self.after.nll:.4f}, accuracy "
                f"{self.before.accuracy:.2%} -> {self.after.accuracy:.2%}"
            )
        return text

    def to_dict(self) -> dict:
        metrics = None
        if self.before is not None or self.after is not None:
            metrics = {
                "before": None if self.before is None else dataclasses.asdict(self.before),
                "after": None if self.after is None else dataclasses.asdict(self.after),
            }
        return _document(
            self.schema,
            {
                "model": self.model,
                "source": self.source,
                "output": self.output,
                "estimator": self.estimator,
                "exact": None if self.exact is None else dataclasses.asdict(self.exact),
                "data": self.data,
                "eval_data": self.eval_data,
                "passes": self.passes,
                "batches": self.batches,
                "samples": self.samples,
                "layers": [dataclasses.asdict(l) for l in self.layers],
                "metrics": metrics,
                "onnx": None if self.onnx is None else self.onnx.to_dict(),
                "notes": list(self.notes),
                "warnings": list(self.warnings),
                "threshold": self.threshold,
                "max_accuracy_drop": self.max_accuracy_drop,
                "summary": {
                    "recalibrated": len(self.recalibrated),
                    "accuracy_drop": self.accuracy_drop,
                    "passed": bool(self),
                    "max_shift_before": max((l.shift_before for l in self.recalibrated), default=None),
                    "max_shift_after": max((l.shift_after for l in self.recalibrated), default=None),
                    "verdict": self.verdict,
                },
            },
        )


# --------------------------------------------------------------------------- swap


@dataclass
class SwapEntry:
    """A regularizer that reaches a norm, and what became of it."""

    name: str
    type: str
    kind: str
    p: float | None
    swapped: bool
    replaced_with: str | None = None
    reason: str | None = None


@dataclass
class SwapReport:
    """What ``varshift.swap`` replaced.

    ``bool(report)`` is True when every targeted regularizer was swapped, the recalibration
    (when run) passed and the ONNX check (when run) passed.
    """

    model: str
    to: str
    beta: float
    entries: list[SwapEntry]
    graph_module: bool
    recalibration: RecalibrationReport | None = None
    output: str | None = None
    onnx: Any = None
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    #: what the verdict advises when nothing recalibrated the swapped model (prose: the
    #: command line says it in flags)
    remedy: str = "recalibrate them now with `varshift.recalibrate()`"

    schema = "varshift.swap/1"

    @property
    def swapped(self) -> list[SwapEntry]:
        return [e for e in self.entries if e.swapped]

    @property
    def skipped(self) -> list[SwapEntry]:
        return [e for e in self.entries if not e.swapped]

    def __bool__(self) -> bool:
        return (not self.skipped and (self.recalibration is None or bool(self.recalibration))
                and (self.onnx is None or bool(self.onnx)))

    @property
    def verdict(self) -> str:
        if not self.entries:
            return "nothing to swap: no active regularizer reaches a BatchNorm"
        text = (
            f"swapped {len(self.swapped)} of {plural(len(self.entries), 'regularizer')} for "
            f"Uout(beta={self.beta:g})"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} could not be swapped"
        if self.recalibration is None:
            text += (
                "; eval outputs are unchanged until the model is fine-tuned (BatchNorm still "
                f"holds the old statistics: {self.remedy})"
            )
        else:
            text += f"; {self.recalibration.verdict}"
        return text

    def to_dict(self) -> dict:
        return _document(
            self.schema,
            {
                "model": self.model,
                "source": self.source,
                "output": self.output,
                "to": self.to,
                "beta": self.beta,
                "graph_module": self.graph_module,
                "swapped": [dataclasses.asdict(e) for e in self.swapped],
                "skipped": [dataclasses.asdict(e) for e in self.skipped],
                "recalibration": None if self.recalibration is None else self.recalibration.to_dict(),
                "onnx": None if self.onnx is None else self.onnx.to_dict(),
                "notes": list(self.notes),
                "summary": {
                    "swapped": len(self.swapped),
                    "skipped": len(self.skipped),
                    "passed": bool(self),
                    "verdict": self.verdict,
                },
            },
        )
