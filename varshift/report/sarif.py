"""A scan report as SARIF 2.1.0: what GitHub code scanning and other SARIF viewers read.

One run; one rule per finding kind (``regularizer-before-norm``, ``dropout-at-inference``,
``norm-without-running-stats``; their descriptions from :mod:`varshift.catalog`) with help
text; one result per finding. A finding whose regularizer has a source location lands on
that line (the line that calls it; else the line that created it); the norms it reaches are
related locations. A finding with no known source (a pickled ``nn.Sequential``) is placed on
the model file, so that every result still has a location, which code scanning requires.

Relative paths are relative to ``%SRCROOT%``, the directory varshift ran in; run it from the
repository root so that code scanning matches them to the repository's files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePath
from typing import Any

from .._version import __version__
from ..catalog import RULES
from ..errors import VarshiftError
from .results import Finding, ScanReport, SourceLocation

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
#: Where the rules' help links point: the project page, which carries the README.
DOCS_URL = "https://pypi.org/project/varshift/"

#: SARIF levels for varshift severities.
LEVELS = {"error": "error", "warning": "warning", "info": "note"}

#: Per rule: (name, short description, help in Markdown, README section anchor).
RULE_HELP = {
    "regularizer-before-norm": (
        "RegularizerBeforeBatchNorm",
        "A dropout-like layer feeds a BatchNorm: its running variance is wrong at inference.",
        "Inverted dropout with drop probability p scales the variance of what flows through it "
        "by about 1/(1-p) during training. A BatchNorm downstream records that training "
        "variance in `running_var`; at inference dropout is off, the real variance is smaller, "
        "and the BatchNorm normalizes with the wrong statistics (the *variance shift*, Li et "
        "al., CVPR 2019). The error compounds through every later BatchNorm.\n\n"
        "**Fix:** recompute the BatchNorm statistics with dropout off (`varshift recalibrate` "
        "with the exact estimator); or replace dropout with Uout (`varshift swap`) and "
        "fine-tune; or move the dropout after the last BatchNorm. `varshift probe` measures "
        "the shift on your data. Each result's remedy says which applies.",
        "how-it-works",
    ),
    "dropout-at-inference": (
        "DropoutAtInference",
        "A functional dropout stays active in eval mode: every inference is random.",
        "A call such as `F.dropout(x, p, training=True)` (or `F.dropout(x, p)`, whose default "
        "is `training=True`) drops activations even after `model.eval()`, so predictions "
        "change from run to run and BatchNorm statistics never match.\n\n"
        "**Fix:** pass `training=self.training`.",
        "how-it-works",
    ),
    "norm-without-running-stats": (
        "BatchNormWithoutRunningStats",
        "A BatchNorm without running statistics: inference depends on the batch.",
        "A BatchNorm built with `track_running_stats=False` keeps no running mean or variance, "
        "so it normalizes with the statistics of each batch in eval mode too: a prediction "
        "depends on what else is in its batch, and a batch of one sample cannot be "
        "normalized.\n\n"
        "**Fix:** train with `track_running_stats=True` (recalibrating every BatchNorm then "
        "fills its statistics), or use GroupNorm or LayerNorm, which do not depend on the batch.",
        "how-it-works",
    ),
}


def _rule(rule_id: str) -> dict[str, Any]:
    name, short, help_md, anchor = RULE_HELP[rule_id]
    return {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": short},
        "fullDescription": {"text": RULES[rule_id]},
        "help": {"text": _plain(help_md), "markdown": help_md},
        "helpUri": f"{DOCS_URL}#{anchor}",
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["pytorch", "batchnorm", "dropout", "correctness"]},
    }


def _plain(markdown: str) -> str:
    return markdown.replace("**", "").replace("`", "")


def _artifact(file: str) -> dict[str, Any]:
    path = PurePath(file)
    if path.is_absolute():
        return {"uri": Path(file).as_uri()}
    return {"uri": path.as_posix(), "uriBaseId": "%SRCROOT%"}


def _physical(loc: SourceLocation) -> dict[str, Any]:
    return {"artifactLocation": _artifact(loc.file), "region": {"startLine": loc.line}}


def _location(loc: SourceLocation | None, name: str, model_file: str | None) -> dict | None:
    out: dict[str, Any] = {"logicalLocations": [{"fullyQualifiedName": name, "kind": "member"}]}
    if loc is not None:
        out["physicalLocation"] = _physical(loc)
    elif model_file:
        out["physicalLocation"] = {"artifactLocation": _artifact(model_file)}
    else:
        return None
    return out


def _result(report: ScanReport, f: Finding, rule_index: int) -> dict[str, Any]:
    loc = f.source or f.defined_at
    where = _location(loc, f.regularizer, report.source)
    message = f.message + f". Remedy: {f.remedy}"
    result: dict[str, Any] = {
        "ruleId": f.rule,
        "ruleIndex": rule_index,
        "level": LEVELS[f.severity],
        "message": {"text": message},
        "locations": [where] if where else [],
        # stable across edits that move lines: the rule, the model and the regularizer's name
        "partialFingerprints": {"varshiftFinding/v1": hashlib.sha256(
            f"{f.rule}\0{report.model}\0{f.regularizer}".encode()).hexdigest()[:32]},
        "properties": {
            "regularizer": f.regularizer,
            "severity": f.severity,
            "direct": list(f.direct),
            "downstreamCount": f.downstream_count,
            "predictedShift": f.predicted_shift,
            "remedy": f.remedy,
        },
    }
    related = []
    for i, name in enumerate(f.direct):
        norm = report.norm(name)
        nloc = None if norm is None else (norm.source or norm.defined_at)
        if norm is not None and nloc is not None:
            related.append({"id": i, "physicalLocation": _physical(nloc),
                            "message": {"text": f"{name} ({norm.type}), which it reaches"}})
    if f.defined_at is not None and f.source is not None and f.defined_at != f.source:
        related.append({"id": len(f.direct), "physicalLocation": _physical(f.defined_at),
                        "message": {"text": f"where {f.regularizer} is created"}})
    if related:
        result["relatedLocations"] = related
    return result


def to_sarif(report: ScanReport) -> dict[str, Any]:
    """``report`` as a SARIF 2.1.0 log (a JSON-ready dict).

    Raises:
        VarshiftError: ``report`` is not a scan report (SARIF describes source findings).
    """
    if not isinstance(report, ScanReport):
        raise VarshiftError(
            f"SARIF is for scan reports; {type(report).__name__} has no source findings "
            "(render it as json, markdown, text or html)")
    rule_ids = list(RULE_HELP)
    results = [_result(report, f, rule_ids.index(f.rule)) for f in report.findings]
    run: dict[str, Any] = {
        "tool": {"driver": {
            "name": "varshift",
            "version": __version__,
            "semanticVersion": __version__,
            "informationUri": DOCS_URL,
            "rules": [_rule(r) for r in rule_ids],
        }},
        "originalUriBaseIds": {"%SRCROOT%": {"uri": Path.cwd().as_uri() + "/"}},
        "results": results,
        "invocations": [{"executionSuccessful": True}],
        "properties": {
            "model": report.model,
            "modelFile": report.source,
            "tracedWith": report.traced_with,
            "verdict": report.verdict,
        },
    }
    return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}
