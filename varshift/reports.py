"""Result objects. Pure data: the passes fill them, ``render`` displays them.

Each report has ``to_dict()`` (the stable JSON documented in DESIGN.md, with ``schema`` and
``varshift_version``) and answers "passed?" with ``__bool__``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__

SEVERITIES = ("info", "warning", "error")  # in increasing order


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


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
    """A regularizer in the model (a module, or a functional call named ``owner:op``)."""

    name: str
    kind: str
    type: str
    p: float | None
    active: bool
    functional: bool
    reaches: list[str]
    always_on: bool = False


@dataclass
class NormEntry:
    """A norm (BatchNorm-family layer) and the active regularizers upstream of it."""

    name: str
    type: str
    affected: bool
    direct: bool
    reached_by: list[str]


@dataclass
class Finding:
    """One rule that fired, with what to do about it."""

    rule: str
    severity: str
    regularizer: str
    direct: list[str]
    downstream_count: int
    predicted_shift: float | None
    remedy: str
    message: str


@dataclass
class ScanReport:
    """What ``varshift.scan`` found in a model's dataflow graph.

    ``bool(report)`` is True when no finding has severity ``error``.
    """

    model: str
    traced_with: str
    regularizers: list[RegularizerEntry]
    norms: list[NormEntry]
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)
    source: str | None = None

    schema = "varshift.scan/1"

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def failed(self, fail_on: str = "error") -> bool:
        """True when a finding reaches ``fail_on`` (``error``, ``warning``; ``never``: False)."""
        if fail_on == "never":
            return False
        return any(severity_rank(f.severity) >= severity_rank(fail_on) for f in self.findings)

    def __bool__(self) -> bool:
        return not self.failed("error")

    @property
    def verdict(self) -> str:
        affected = [n for n in self.norms if n.affected]
        active = [r for r in self.regularizers if r.active]
        shifts = [f.predicted_shift for f in self.findings if f.predicted_shift is not None]
        if not self.findings:
            if not self.norms:
                return f"clean: no BatchNorm layers ({len(self.regularizers)} regularizers)"
            return (
                f"clean: no active regularizer reaches a BatchNorm ({len(active)} active "
                f"regularizers, {len(self.norms)} BatchNorm layers)"
            )
        parts = []
        shifting = [f for f in self.findings if f.rule == "regularizer-before-norm"]
        if shifting:
            worst = f", worst predicted shift {max(shifts):.2f}x" if shifts else ""
            parts.append(
                f"{len(shifting)} regularizer(s) shift the statistics of {len(affected)} of "
                f"{len(self.norms)} BatchNorm layers{worst}"
            )
        random = [f for f in self.findings if f.rule == "dropout-at-inference"]
        if random:
            parts.append(f"{len(random)} dropout call(s) stay active at inference")
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
