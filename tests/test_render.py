"""Golden-file tests for the rendered scan reports (text and Markdown).

Regenerate after an intended change with ``pytest tests/test_render.py --update-golden`` and
review the diff of ``tests/golden/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import varshift
from varshift import render

from conftest import GOLDEN
from fixtures import models as M

WIDTH = 100


def _report(name: str):
    torch.manual_seed(0)
    if name == "module_dropout_bn":
        report = varshift.scan(M.ModuleDropoutBN())
    elif name == "always_on_dropout":
        report = varshift.scan(M.AlwaysOnDropout())
    elif name == "clean_head":
        report = varshift.scan(M.DropoutHead())
    elif name == "inactive":
        report = varshift.scan(M.InactiveDropout())
    elif name == "data_dependent":
        report = varshift.scan(M.DataDependent(), example_input=M.example((2, 3, 8, 8)))
    else:  # pragma: no cover
        raise KeyError(name)
    report.source = f"fixtures/{name}.pt"  # no tmp paths in golden output
    return report


NAMES = ["module_dropout_bn", "always_on_dropout", "clean_head", "data_dependent"]


def _check_golden(path: Path, actual: str, update: bool) -> None:
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing: run pytest --update-golden"
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, f"{path.name} differs: run pytest --update-golden and review"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt,ext", [("text", "txt"), ("markdown", "md")])
def test_golden(name: str, fmt: str, ext: str, update_golden: bool) -> None:
    actual = render.render_to_string(_report(name), fmt, width=WIDTH)
    assert "\x1b" not in actual
    if fmt == "text":
        assert max(len(line) for line in actual.splitlines()) <= WIDTH
        assert all(line == line.rstrip() for line in actual.splitlines())
    _check_golden(GOLDEN / f"{name}.{ext}", actual, update_golden)


def test_golden_files_have_no_machine_paths() -> None:
    for path in GOLDEN.glob("*"):
        text = path.read_text(encoding="utf-8")
        assert "/tmp" not in text and str(Path.home()) not in text, path.name


def test_text_content() -> None:
    """What the golden files must say, independent of layout."""
    text = render.render_to_string(_report("module_dropout_bn"), "text", width=WIDTH)
    assert text.startswith("varshift scan: fixtures/module_dropout_bn.pt (ModuleDropoutBN), "
                           "traced with torch.fx")
    assert "1.25x" in text and "bn1" in text
    assert text.rstrip().splitlines()[-1].startswith("ERROR ")

    clean = render.render_to_string(_report("clean_head"), "text", width=WIDTH)
    assert clean.rstrip().splitlines()[-1].startswith("OK clean")
    assert "drop [Dropout(p=0.5)]: reaches no BatchNorm" in clean

    inactive = render.render_to_string(_report("inactive"), "text", width=WIDTH)
    assert "drop [Dropout(p=0)]: inactive" in inactive
    assert "off:dropout [dropout(p=0.3)]: inactive" in inactive

    always = render.render_to_string(_report("always_on_dropout"), "markdown", width=WIDTH)
    assert "1 dropout call stays active at inference" in always
    assert "training=self.training" in always


def test_json_render_is_the_document() -> None:
    report = _report("data_dependent")
    doc = json.loads(render.render_to_string(report, "json"))
    assert doc == json.loads(json.dumps(report.to_dict()))
    assert doc["source"] == "fixtures/data_dependent.pt"
    assert doc["summary"]["traced_with"] == "dynamic"


def test_format_for_path() -> None:
    assert render.format_for_path("a/B.JSON", "text") == "json"
    assert render.format_for_path("r.md", "json") == "markdown"
    assert render.format_for_path("r.markdown", "json") == "markdown"
    assert render.format_for_path("r.txt", "json") == "json"
    assert render.format_for_path("r", "text") == "text"


def test_markdown_escapes_pipes() -> None:
    report = _report("module_dropout_bn")
    report.findings[0].remedy = "a | b"
    md = render.render_to_string(report, "markdown")
    assert "a \\| b" in md
