"""Source locations of regularizers and norms: the line that calls them and the line that
created them, checked against the source text found with ``inspect`` (no hard-coded lines)."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import varshift
from varshift.sources import display_path
from varshift.reports import SourceLocation

from conftest import REPO


def line_of(obj, marker: str) -> int:
    """The 1-based line number, in ``obj``'s file, of the single line of ``obj``'s source that
    contains ``marker``."""
    lines, start = inspect.getsourcelines(obj)
    hits = [start + i for i, text in enumerate(lines) if marker in text]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


HERE = os.path.relpath(__file__)  # the tests run from the repository root


def helper_dropout(x, p, training):
    return F.dropout(x, p, training)  # functional, one call away from forward


class Net(nn.Module):
    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(
            nn.Conv2d(4, 4, 1),
            nn.Dropout2d(p),
            nn.BatchNorm2d(4),
        )

    def forward(self, x):
        x = self.conv(x)
        x = self.drop(x)
        x = self.bn(x)
        x = helper_dropout(x, 0.2, self.training)
        return self.head(x)


EXAMPLE = torch.randn(2, 3, 6, 6)


def expected() -> dict[str, tuple[SourceLocation | None, SourceLocation | None]]:
    fwd = lambda m: SourceLocation(HERE, line_of(Net.forward, m), "forward")  # noqa: E731
    init = lambda m: SourceLocation(HERE, line_of(Net.__init__, m))  # noqa: E731
    return {
        "drop": (fwd("self.drop(x)"), init("self.drop = ")),
        "bn": (fwd("self.bn(x)"), init("self.bn = ")),
        ":dropout": (SourceLocation(HERE, line_of(helper_dropout, "F.dropout"), "helper_dropout"),
                     None),
        # torch's Sequential.forward calls them: the user's line is the one calling the head
        "head.1": (fwd("self.head(x)"), init("nn.Dropout2d(p)")),
        "head.2": (fwd("self.head(x)"), init("nn.BatchNorm2d(4),")),
    }


@pytest.mark.parametrize("tracer", ["fx", "dynamic"])
def test_module_and_functional_locations(tracer: str) -> None:
    if tracer == "fx":
        report = varshift.scan(Net())
    else:
        from varshift.graph import dynamic_graph
        from varshift.rules import scan_graph

        report = scan_graph(dynamic_graph(Net(), EXAMPLE))
    assert report.traced_with == tracer
    got = {e.name: (e.source, e.defined_at) for e in [*report.regularizers, *report.norms]}
    assert got == expected()
    for f in report.findings:  # a finding carries its regularizer's locations
        assert (f.source, f.defined_at) == expected()[f.regularizer]


def test_json_has_source_objects_and_null_when_unknown() -> None:
    doc = json.loads(json.dumps(varshift.scan(Net()).to_dict()))
    finding = next(f for f in doc["findings"] if f["regularizer"] == "drop")
    assert finding["source"] == {"file": HERE, "line": line_of(Net.forward, "self.drop(x)"),
                                 "function": "forward"}
    assert finding["defined_at"]["line"] == line_of(Net.__init__, "self.drop = ")
    functional = next(f for f in doc["findings"] if f["regularizer"] == ":dropout")
    assert functional["defined_at"] is None


def test_pickled_sequential_has_no_source() -> None:
    """A whole nn.Sequential saved by torch.save: torch's code calls every layer and nothing
    in the user's code created them that can still be read."""
    model = torch.load(REPO / "sample_models" / "digits_dropout_bn.pt", weights_only=False)
    report = varshift.scan(model)
    assert report.findings
    assert all(f.source is None and f.defined_at is None for f in report.findings)
    assert all(n.source is None for n in report.norms)


def test_paths_outside_the_current_directory_are_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    report = varshift.scan(Net())
    drop = next(r for r in report.regularizers if r.name == "drop")
    assert drop.source.file == str(Path(__file__).resolve())


def test_cli_locates_the_sample_models_functional_dropout(cli, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    res = cli("scan", "sample_models/digits_functional_ckpt.pt",
              "--arch", "sample_models/digits_functional.py:build",
              "--arch-args", '{"drop_rate": 0.3}', "--format", "json")
    assert res.code == 1, res.err
    doc = json.loads(res.out)
    text = (REPO / "sample_models" / "digits_functional.py").read_text().splitlines()
    dropout_lines = [i + 1 for i, t in enumerate(text) if "F.dropout(" in t and "x =" in t]
    assert len(dropout_lines) == 3
    got = {f["regularizer"]: f["source"] for f in doc["findings"]}
    assert got == {
        ":dropout": {"file": "sample_models/digits_functional.py", "line": dropout_lines[0],
                     "function": "forward"},
        ":dropout_1": {"file": "sample_models/digits_functional.py", "line": dropout_lines[1],
                       "function": "forward"},
    }
    bn2 = next(n for n in doc["norms"] if n["name"] == "bn2")
    assert bn2["defined_at"]["line"] == 1 + next(
        i for i, t in enumerate(text) if "self.bn2 = " in t)
    md = cli("scan", "sample_models/digits_functional_ckpt.pt",
             "--arch", "sample_models/digits_functional.py:build", "--format", "markdown").out
    assert f"`sample_models/digits_functional.py:{dropout_lines[0]}` in `forward`" in md


def test_definition_site_is_none_when_not_literal() -> None:
    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i in range(2):
                setattr(self, f"drop{i}", nn.Dropout(0.1))
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.drop1(self.drop0(x)))

    report = varshift.scan(Looped())
    assert {r.name: r.defined_at for r in report.regularizers} == {"drop0": None, "drop1": None}
    assert report.norm("bn").defined_at.line == line_of(Looped.__init__, "self.bn = ")
    assert report.regularizer("drop1").source.line == line_of(Looped.forward, "return self.bn")


# --------------------------------------------------------------------------- real architectures


@pytest.mark.arch
def test_timm_resnet_drop_path_and_dropblock_lines_inside_timm() -> None:
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock

    model = timm.create_model("resnet18", drop_block_rate=0.2, drop_path_rate=0.1)
    report = varshift.scan(model)
    timm_file = display_path(inspect.getsourcefile(BasicBlock))  # relative inside the cwd
    drop_path = report.regularizer("layer1.1.drop_path")
    assert drop_path.source == SourceLocation(
        timm_file, line_of(BasicBlock.forward, "x = self.drop_path(x)"), "forward")
    assert drop_path.defined_at == SourceLocation(
        timm_file, line_of(BasicBlock.__init__, "self.drop_path = drop_path"))
    block = report.regularizer("layer3.0.drop_block")
    assert block.source.line == line_of(BasicBlock.forward, "x = self.drop_block(x)")
    assert block.defined_at.line == line_of(BasicBlock.__init__, "self.drop_block = ")
    bn1 = report.norm("layer3.0.bn1")
    assert bn1.source.line == line_of(BasicBlock.forward, "x = self.bn1(x)")
    assert bn1.defined_at.line == line_of(BasicBlock.__init__, "self.bn1 = ")
    finding = next(f for f in report.findings if f.regularizer == "layer1.1.drop_path")
    assert finding.source == drop_path.source


@pytest.mark.arch
def test_torchvision_densenet_functional_dropout_line() -> None:
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.densenet import _DenseLayer

    model = torchvision.models.densenet121(weights=None, drop_rate=0.2)
    report = varshift.scan(model)
    tv_file = display_path(inspect.getsourcefile(_DenseLayer))  # relative inside the cwd
    reg = report.regularizer("features.denseblock2.denselayer3:dropout")
    assert reg.source == SourceLocation(
        tv_file, line_of(_DenseLayer.forward, "F.dropout("), "forward")
    assert reg.defined_at is None  # a function call: nothing was created
    norm2 = report.norm("features.denseblock2.denselayer3.norm2")
    assert norm2.defined_at == SourceLocation(tv_file, line_of(_DenseLayer.__init__, "self.norm2 = "))


def test_source_location_is_one_class_under_every_name() -> None:
    """graph/ reads it from varshift._types; the reports re-export the same class."""
    import varshift._types
    import varshift.report.results

    assert SourceLocation is varshift.report.results.SourceLocation is varshift._types.SourceLocation
    assert str(SourceLocation("a.py", 3, "f")) == "a.py:3 in f" and str(SourceLocation("a.py", 3)) == "a.py:3"
