"""``--format sarif``: valid SARIF 2.1.0 (checked against the official schema shipped in
tests/data), one rule per finding kind, each finding on the line that calls its regularizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, TESTS

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = json.loads((TESTS / "data" / "sarif-schema-2.1.0.json").read_text())
FUNCTIONAL = ["sample_models/digits_functional_ckpt.pt", "--arch",
              "sample_models/digits_functional.py:build", "--arch-args", '{"drop_rate": 0.3}']


def validate(doc: dict) -> None:
    jsonschema.Draft4Validator.check_schema(SCHEMA)
    errors = sorted(jsonschema.Draft4Validator(SCHEMA).iter_errors(doc), key=lambda e: e.path)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # SARIF paths are relative to where varshift runs


def test_the_schema_rejects_a_broken_log() -> None:
    """The validator is not a rubber stamp: a missing version and a bad level are errors."""
    with pytest.raises(AssertionError):
        validate({"runs": []})
    with pytest.raises(AssertionError):
        validate({"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "x"}},
                                                "results": [{"message": {"text": "m"},
                                                             "level": "fatal"}]}]})


def test_functional_sample_model_findings_land_on_their_lines(cli) -> None:
    res = cli("scan", *FUNCTIONAL, "--format", "sarif")
    assert res.code == 1, res.err  # errors found: the exit code is the scan's
    doc = json.loads(res.out)
    validate(doc)
    (run,) = doc["runs"]
    rules = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert rules == ["regularizer-before-norm", "dropout-at-inference", "norm-without-running-stats"]
    assert all(r["help"]["markdown"] and r["helpUri"] for r in run["tool"]["driver"]["rules"])

    source = (REPO / "sample_models" / "digits_functional.py").read_text().splitlines()
    dropout_lines = [i + 1 for i, t in enumerate(source) if "x = F.dropout(" in t]
    bn_lines = {name: 1 + next(i for i, t in enumerate(source) if f"self.{name}(" in t)
                for name in ("bn2", "bn3")}
    results = run["results"]
    assert [r["properties"]["regularizer"] for r in results] == [":dropout", ":dropout_1"]
    for result, line, norm in zip(results, dropout_lines[:2], ("bn2", "bn3")):
        assert result["ruleId"] == rules[result["ruleIndex"]] == "regularizer-before-norm"
        assert result["level"] == "error"
        (loc,) = result["locations"]
        assert loc["physicalLocation"]["artifactLocation"] == {
            "uri": "sample_models/digits_functional.py", "uriBaseId": "%SRCROOT%"}
        assert loc["physicalLocation"]["region"] == {"startLine": line}
        related = result["relatedLocations"][0]
        assert related["physicalLocation"]["region"]["startLine"] == bn_lines[norm]
        assert "recalibrate" in result["message"]["text"]
    base = run["originalUriBaseIds"]["%SRCROOT%"]["uri"]
    assert base == REPO.resolve().as_uri() + "/"


def test_pickled_model_without_source_lands_on_the_model_file(cli) -> None:
    res = cli("scan", "sample_models/digits_dropout_bn.pt", "--format", "sarif")
    doc = json.loads(res.out)
    validate(doc)
    (result,) = doc["runs"][0]["results"]
    (loc,) = result["locations"]
    assert loc["physicalLocation"] == {"artifactLocation": {
        "uri": "sample_models/digits_dropout_bn.pt", "uriBaseId": "%SRCROOT%"}}
    assert loc["logicalLocations"] == [{"fullyQualifiedName": "4", "kind": "member"}]


def test_clean_model_has_no_results_and_a_report_file(cli, tmp_path: Path) -> None:
    out = tmp_path / "scan.sarif"
    res = cli("scan", "sample_models/digits_clean.pt", "--report", out)
    assert res.code == 0 and res.out.startswith("varshift scan")  # stdout stays text
    doc = json.loads(out.read_text())
    validate(doc)
    assert doc["runs"][0]["results"] == []


def test_always_on_dropout_and_warning_levels() -> None:
    import varshift
    from varshift.sarif import to_sarif
    from fixtures import models as M

    doc = to_sarif(varshift.scan(M.AlwaysOnDropout()))
    validate(doc)
    assert {r["ruleId"] for r in doc["runs"][0]["results"]} == {"dropout-at-inference"}
    doc = to_sarif(varshift.scan(M.plain_warning()))
    validate(doc)
    assert [r["level"] for r in doc["runs"][0]["results"]] == ["warning"]


def test_every_rule_has_help_and_a_norm_without_running_stats_is_reported() -> None:
    """Every rule of the catalogue has SARIF help; a BatchNorm without running statistics (a
    finding of its own rule) is a result, not a crash."""
    import torch.nn as nn

    import varshift
    from varshift.catalog import RULES
    from varshift.report.sarif import RULE_HELP, to_sarif

    assert list(RULE_HELP) and set(RULE_HELP) == set(RULES)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    doc = to_sarif(varshift.scan(model))
    validate(doc)
    (run,) = doc["runs"]
    (result,) = run["results"]
    assert result["ruleId"] == "norm-without-running-stats" and result["level"] == "warning"
    rule = run["tool"]["driver"]["rules"][result["ruleIndex"]]
    assert rule["id"] == result["ruleId"] and rule["fullDescription"]["text"] == RULES[rule["id"]]


@pytest.mark.parametrize("argv", [
    ["probe", "sample_models/digits_dropout_bn.pt", "--data", "sample_models/digits_calib.pt",
     "--format", "sarif"],
    ["probe", "sample_models/digits_dropout_bn.pt", "--data", "sample_models/digits_calib.pt",
     "--report", "x.sarif"],
])
def test_sarif_is_refused_for_other_commands_before_any_work(cli, argv) -> None:
    res = cli(*argv)
    assert res.code == 2 and res.out == ""
    assert res.err.startswith("varshift: error: ") and "only for `varshift scan`" in res.err
    assert not (REPO / "x.sarif").exists()
