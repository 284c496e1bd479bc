"""Golden-file tests for every renderer (scan, probe, recalibrate, swap, export; text and
Markdown), and the probe table's layout at any width.

Scan reports come from real fixture models; the others are built here from numbers of real
runs on the sample models, so the golden files pin the rendering, not float noise.
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
from varshift.cli.terms import localize

from conftest import GOLDEN
from fixtures import models as M
from varshift.reports import (
    LayerFix,
    LayerShift,
    Metrics,
    ParityCheck,
    ParityResult,
    ProbeReport,
    RecalibrationReport,
    SwapEntry,
    SwapReport,
)

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


def _layer(name, affected, reached_by, channels, rv, ev, tv, shift, tshift, med, mx, calls=1):
    return LayerShift(name=name, type="BatchNorm2d", affected=affected, reached_by=reached_by,
                      channels=channels, running_var_mean=rv, eval_var_mean=ev, train_var_mean=tv,
                      shift=shift, train_shift=tshift, channel_shift_median=med,
                      channel_shift_max=mx, running_mean_mean=-0.1, eval_mean_mean=-0.1,
                      train_mean_mean=-0.1, mean_offset=0.005, calls=calls)


def probe_report(threshold: float = 1.1) -> ProbeReport:
    """digits_dropout_bn.pt on digits_calib.pt (the README's run)."""
    return ProbeReport(
        model="Sequential", samples=512, batches=8, seed=0, threshold=threshold, traced_with="fx",
        source="sample_models/digits_dropout_bn.pt", data="sample_models/digits_calib.pt",
        layers=[
            _layer("1", False, [], 32, 0.0435847, 0.0436847, 0.0436847, 1.00229, 1.0, 1.00, 1.01),
            _layer("5", True, ["4"], 64, 1.57237, 0.671749, 1.57101, 2.34068, 2.33866, 2.09, 7.22),
            _layer("9", True, ["4"], 64, 2.73678, 1.49193, 2.72633, 1.83438, 1.82737, 1.84, 2.04),
        ],
    )


def _parity(passed: bool = True) -> ParityResult:
    checks = [
        ParityCheck("calibration batch 1", 64, 1.04904e-05, 0.000139231, True),
        ParityCheck("batch size 1", 1, 4.76837e-06, 1.64665e-06, True),
        ParityCheck("batch size 7", 7, 7.62939e-06 if passed else 0.25,
                    1.77746e-05 if passed else 0.5, passed),
    ]
    return ParityResult(
        output="out/digits_fixed.onnx", model="Sequential",
        max_abs_diff=max(c.max_abs_diff for c in checks),
        max_rel_diff=max(c.max_rel_diff for c in checks), passed=passed, atol=1e-4, rtol=1e-3,
        batch_sizes=[1, 7, 64], outputs=1, opset=20, exporter="torch.export", file_size=246148,
        checks=checks, source="out/digits_fixed.pt",
        notes=[] if passed else ["onnxruntime differs from PyTorch at batch size 7"],
    )


def _fix(name, recal, sb, sa, vb, va):
    return LayerFix(name=name, type="BatchNorm2d", recalibrated=recal, shift_before=sb,
                    shift_after=sa, running_var_before=vb, running_var_after=va,
                    running_mean_before=-0.1, running_mean_after=-0.1)


def recal_report(clean: bool = False, onnx: bool = True) -> RecalibrationReport:
    if clean:
        layers = [_fix("1", False, 1.00157, 1.00157, 0.0452, 0.0452),
                  _fix("4", False, 1.0027, 1.0027, 0.5796, 0.5796)]
        passes = batches = 0
        notes = ["no BatchNorm layer is reached by an active regularizer; nothing to recalibrate "
                 "(use `all_norms=True` to recalibrate every BatchNorm)"]
    else:
        layers = [_fix("1", False, 1.00229, 1.00229, 0.0435847, 0.0435847),
                  _fix("5", True, 2.34068, 1.0, 1.57237, 0.671749),
                  _fix("9", True, 1.83438, 1.0, 2.73678, 3.39117)]
        passes, batches, notes = 2, 8, []
    return RecalibrationReport(
        model="Sequential", estimator="population" if clean else "exact", layers=layers,
        before=Metrics(0.995976, 0.0293159, 497, True), after=Metrics(0.993964, 0.0212, 497, True),
        passes=passes, batches=batches, samples=512, output="out/digits_fixed.pt",
        onnx=_parity() if onnx and not clean else None, notes=notes,
        source="sample_models/digits_dropout_bn.pt", data="sample_models/digits_calib.pt",
        eval_data="sample_models/digits_test.pt",
    )


def swap_report(recalibrated: bool) -> SwapReport:
    entries = [
        SwapEntry("4", "Dropout", "dropout", 0.5, True, "Uout(beta=0.1)"),
        SwapEntry("attn", "MultiheadAttention", "dropout", 0.1, False, None,
                  "dropout inside torch's MultiheadAttention (its `dropout` argument): set it to 0 "
                  "in the model's code"),
    ]
    rec = None
    if recalibrated:
        rec = recal_report(onnx=False)
        rec.estimator, rec.output, rec.source, rec.eval_data = "population", None, None, None
        rec.before, rec.after = Metrics(1.0, 0.0073, 512, False), Metrics(1.0, 0.0007, 512, False)
    return SwapReport(model="Sequential", to="uout", beta=0.1, entries=entries, graph_module=False,
                      recalibration=rec, output="out/swapped.pt",
                      source="sample_models/digits_dropout_bn.pt",
                      # what swap_file says (the library's swap() has no `data` to pass)
                      remedy="pass `data` to recalibrate them now")


BUILT = {
    "probe": probe_report,
    "probe_passing": lambda: probe_report(threshold=2.5),
    "recalibrate": recal_report,
    "recalibrate_clean": lambda: recal_report(clean=True),
    "swap": lambda: swap_report(False),
    "swap_recalibrated": lambda: swap_report(True),
    "export": _parity,
    "export_failed": lambda: _parity(passed=False),
}


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
    # the golden files are what the command line prints: its reports speak in flags
    actual = render.render_to_string(localize(_report(name)), fmt, width=WIDTH)
    assert "\x1b" not in actual
    if fmt == "text":
        assert max(len(line) for line in actual.splitlines()) <= WIDTH
        assert all(line == line.rstrip() for line in actual.splitlines())
    _check_golden(GOLDEN / f"{name}.{ext}", actual, update_golden)


@pytest.mark.parametrize("name", sorted(BUILT))
@pytest.mark.parametrize("fmt,ext", [("text", "txt"), ("markdown", "md")])
def test_golden_built(name: str, fmt: str, ext: str, update_golden: bool) -> None:
    actual = render.render_to_string(localize(BUILT[name]()), fmt, width=WIDTH)
    assert "\x1b" not in actual
    if fmt == "text":
        assert max(len(line) for line in actual.splitlines()) <= WIDTH
        assert all(line == line.rstrip() for line in actual.splitlines())
    _check_golden(GOLDEN / f"{name}.{ext}", actual, update_golden)


def test_every_report_type_has_golden_files() -> None:
    """Each renderer (both formats) is pinned by at least one golden file."""
    types = {type(BUILT[name]()).__name__ for name in BUILT} | {"ScanReport"}
    assert types == {"ScanReport", "ProbeReport", "RecalibrationReport", "SwapReport",
                     "ParityResult"}
    names = {p.name for p in GOLDEN.iterdir()}
    for name in [*BUILT, *NAMES]:
        assert {f"{name}.txt", f"{name}.md"} <= names, name


def test_built_reports_say_what_they_should() -> None:
    """The facts the golden files must hold, independent of layout."""
    probe = render.render_to_string(probe_report(), "text", width=WIDTH)
    assert probe.rstrip().splitlines()[-2].startswith("SHIFTED 2 of 3 BatchNorm layers")
    assert "2.341x" in probe and "2.339x" in probe
    assert render.render_to_string(probe_report(2.5), "text", width=WIDTH).rstrip(
    ).splitlines()[-1].startswith("OK no BatchNorm layer reaches 2.5x")
    clean = render.render_to_string(recal_report(clean=True), "text", width=WIDTH)
    assert "0 passes" not in clean and "not run (512 calibration samples measured)" in clean
    swap = render.render_to_string(swap_report(False), "markdown")
    assert "Dropout(p=0.5)" in swap and "could not be swapped" in swap
    failed = render.render_to_string(_parity(passed=False), "text", width=WIDTH)
    assert "2.50e-01" in failed


@pytest.mark.parametrize("width", [40, 50, 60, 72, 80, 100, 120, 160])
def test_probe_table_never_breaks_a_number(width: int) -> None:
    """At any width every line fits and every number a row shows is whole (no ``0.043|58``):
    columns that do not fit are left out, and a line says which."""
    report = probe_report()
    out = render.render_to_string(report, "text", width=width)
    assert max(len(line) for line in out.splitlines()) <= width
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == len(report.layers)  # one line per layer: nothing wrapped
    for row, layer in zip(rows, report.layers):
        cells = [c.strip() for c in row.strip("│").split("│")]
        whole = {render._fmt_var(layer.running_var_mean), render._fmt_var(layer.eval_var_mean),
                 render._fmt_var(layer.train_var_mean), f"{layer.shift:.3f}x",
                 f"{layer.train_shift:.3f}x",
                 f"{layer.channel_shift_median:.2f}x / {layer.channel_shift_max:.2f}x"}
        names = {layer.name, render._affected_cell(layer)}
        numeric = [c for c in cells if c and c[0].isdigit() and c not in names]
        assert numeric and set(numeric) <= whole, (width, row)
        assert f"{layer.shift:.3f}x" in cells  # the shift itself is never left out
    flat = " ".join(out.split())  # the note itself may wrap
    if width >= 125:
        assert "left out" not in flat and "bar: log scale" in flat
    if width <= 80:
        assert "left out at this width" in flat


def test_library_reports_name_parameters_and_the_cli_reads_flags() -> None:
    """A report speaks to a Python user in parameters (```data```, ```all_norms=True```); the
    command line's localized copy says the same in flags, and the report is not changed."""
    swap, clean = swap_report(False), recal_report(clean=True)
    for report, library, cli in ((swap, "pass `data` to recalibrate them now", "pass --data to"),
                                 (clean, "(use `all_norms=True` to", "(use --all-norms to")):
        for fmt in ("text", "markdown", "json", "html"):
            said = " ".join(render.render_to_string(report, fmt, width=WIDTH).split())
            assert library in said and "--data" not in said and "--all-norms" not in said, fmt
            localized = " ".join(render.render_to_string(localize(report), fmt, width=WIDTH).split())
            assert cli in localized and library not in localized, fmt
    assert swap.remedy == "pass `data` to recalibrate them now"
    bare = SwapReport(model="M", to="uout", beta=0.1, entries=swap.entries, graph_module=False)
    assert bare.remedy == "recalibrate them now with `varshift.recalibrate()`"
    assert localize(bare).verdict.endswith("recalibrate them now with `varshift recalibrate`)")
    # a finding's remedy names the library call; the command line reads it as the command
    scan = _report("module_dropout_bn")
    (finding,) = scan.findings
    assert finding.remedy.startswith("`varshift.recalibrate(exact=True)`; or `varshift.swap` to ")
    assert localize(scan).findings[0].remedy.startswith(
        "`varshift recalibrate --exact`; or `varshift swap` to Uout and fine-tune")
    assert finding.remedy.startswith("`varshift.recalibrate(")  # the report is not changed
    assert swap.verdict.endswith("(BatchNorm still holds the old statistics: pass `data` to "
                                 "recalibrate them now)")


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
