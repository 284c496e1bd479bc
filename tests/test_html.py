"""HTML reports (``--report FILE.html``, any command): a self-contained page whose chart has
one mark per layer carrying the report's numbers, drawn to a log scale checked here."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import REPO

SAMPLE = "sample_models/digits_dropout_bn.pt"
CALIB = "sample_models/digits_calib.pt"


class Page(HTMLParser):
    """Every element as (tag, attrs, id of the enclosing svg); plus the visible text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict, str | None]] = []
        self.svg: str | None = None
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.svg = a.get("id")
        self.elements.append((tag, a, self.svg))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "svg":
            self.svg = None

    def handle_data(self, data):
        self.text.append(data)

    def marks(self, chart: str, series: str | None = None) -> list[dict]:
        return [a for tag, a, svg in self.elements if svg == chart
                and "mark" in a.get("class", "").split()
                and (series is None or a["data-series"] == series)]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch) -> None:
    monkeypatch.chdir(REPO)


def assert_self_contained(html: str) -> None:
    page = Page(html)
    tags = {tag for tag, _, _ in page.elements}
    assert "script" not in tags and "link" not in tags and "img" not in tags and "iframe" not in tags
    assert not any("src" in a or "href" in a for _, a, _ in page.elements)
    assert "http" not in html and "url(" not in html and "@import" not in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_probe_chart_has_one_mark_per_layer_with_its_values(cli, tmp_path: Path) -> None:
    out = tmp_path / "probe.html"
    res = cli("probe", SAMPLE, "--data", CALIB, "--format", "json", "--report", out)
    assert res.code == 1, res.err  # the sample model is shifted: probe fails at 1.1x
    doc = json.loads(res.out)  # the same report, as JSON
    html = out.read_text()
    assert_self_contained(html)
    page = Page(html)
    layers = doc["layers"]
    bars = page.marks("shift-chart")
    assert [b["data-layer"] for b in bars] == [l["name"] for l in layers]
    assert [float(b["data-value"]) for b in bars] == [l["shift"] for l in layers]
    # a log scale from the floor: heights are proportional to log(value / floor)
    from varshift.html import SHIFT_FLOOR

    heights = [float(b["height"]) for b in bars]
    ref = max(range(len(bars)), key=lambda i: heights[i])
    assert layers[ref]["name"] == doc["summary"]["worst_layer"]
    for h, l in zip(heights, layers):
        expected = heights[ref] * math.log(l["shift"] / SHIFT_FLOOR) / math.log(
            layers[ref]["shift"] / SHIFT_FLOOR)
        assert h == pytest.approx(expected, abs=0.15)
    flagged = [b["data-layer"] for b in bars if "over" in b["class"].split()]
    assert flagged == [l["name"] for l in layers if l["shift"] >= 1.1]

    for series, key in (("running var", "running_var_mean"), ("eval var", "eval_var_mean"),
                        ("train var", "train_var_mean")):
        marks = page.marks("variance-chart", series)
        assert [(m["data-layer"], float(m["data-value"])) for m in marks] == [
            (l["name"], l[key]) for l in layers]
    text = " ".join(page.text)
    assert doc["summary"]["verdict"] in text and "SHIFTED" in text  # 1.1x is reached


def test_recalibrate_chart_before_and_after_and_metrics(cli, tmp_path: Path) -> None:
    out = tmp_path / "recal.html"
    res = cli("recalibrate", SAMPLE, "--data", CALIB, "--exact", "--eval-data",
              "sample_models/digits_test.pt", "--output", tmp_path / "fixed.pt",
              "--format", "json", "--report", out)
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    html = out.read_text()
    assert_self_contained(html)
    page = Page(html)
    for series, key in (("shift before", "shift_before"), ("shift after", "shift_after")):
        marks = page.marks("shift-chart", series)
        assert [(m["data-layer"], float(m["data-value"])) for m in marks] == [
            (l["name"], l[key]) for l in doc["layers"]]
    text = " ".join(page.text)
    before, after = doc["metrics"]["before"], doc["metrics"]["after"]
    assert f"{before['accuracy']:.2%}" in text and f"{after['nll']:.4f}" in text
    assert "held-out" in text


def test_scan_html_has_predicted_shifts_paths_and_sources(cli, tmp_path: Path) -> None:
    out = tmp_path / "scan.html"
    res = cli("scan", "sample_models/digits_functional_ckpt.pt", "--arch",
              "sample_models/digits_functional.py:build", "--format", "json", "--report", out)
    assert res.code == 1
    doc = json.loads(res.out)
    html = out.read_text()
    assert_self_contained(html)
    page = Page(html)
    marks = page.marks("shift-chart")
    predicted = {}
    for f in doc["findings"]:
        reach = next(r["reaches"] for r in doc["regularizers"] if r["name"] == f["regularizer"])
        for n in reach:
            predicted[n] = max(predicted.get(n, 1.0), f["predicted_shift"])
    assert [(m["data-layer"], float(m["data-value"])) for m in marks] == [
        (n["name"], predicted.get(n["name"], 1.0)) for n in doc["norms"]]
    text = " ".join(page.text)
    src = doc["findings"][0]["source"]
    assert f"{src['file']}:{src['line']}" in text
    assert ":dropout → bn2 (direct) → bn3" in " ".join(text.split())


def test_every_command_writes_html(cli, tmp_path: Path) -> None:
    runs = {
        "export": ["export", SAMPLE, "--data", CALIB, "--max-batches", "1",
                   "--output", tmp_path / "m.onnx"],
        "swap": ["swap", SAMPLE, "--output", tmp_path / "s.pt", "--data", CALIB,
                 "--max-batches", "2"],
    }
    for name, argv in runs.items():
        out = tmp_path / f"{name}.html"
        res = cli(*argv, "--report", out, "--quiet")
        assert res.code == 0, (name, res.err)
        html = out.read_text()
        assert_self_contained(html)
        assert f"<h1>varshift {name}</h1>" in html


def test_many_layers_stay_readable() -> None:
    """A DenseNet-sized report: one mark per layer and a bounded width."""
    from varshift.html import Series, chart

    names = [f"features.block{i}.norm" for i in range(120)]
    svg = chart("c", names, [Series("shift", [1.0 + i / 100 for i in range(120)])],
                y_label="shift", floor=0.97, threshold=1.1, unit="x")
    page = Page(svg)
    assert len(page.marks("c")) == 120
    width = float(next(a for t, a, _ in page.elements if t == "svg")["width"])
    assert width <= 1100


def test_zero_and_infinite_values_stay_on_the_axis() -> None:
    from varshift.html import Series, chart

    svg = chart("v", ["a", "b", "c"], [Series("var", [0.0, 1.0, float("inf")], "circle")],
                y_label="variance")
    marks = Page(svg).marks("v")
    assert [m["data-value"] for m in marks] == ["0.0", "1.0", "inf"]
    ys = [float(m["cy"]) for m in marks]
    assert ys[0] > ys[1] > ys[2]  # bottom, middle, top
