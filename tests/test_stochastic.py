"""Regularizers found by what they do (kind ``stochastic``), ops that carry their own dropout
(sdpa, RNNs), class names by suffix, LayerDrop with a deterministic scan; ground truth from
running the models (tests/arch_helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch

import varshift
from varshift import graph as vgraph
from varshift import rules

import arch_helpers as H
from fixtures import models as M
from fixtures import probe_models as P
from fixtures import stochastic_models as S


def affected(report) -> set[str]:
    return {n.name for n in report.norms if n.affected}


@pytest.mark.parametrize("style", list(S.STYLES))
@pytest.mark.parametrize("tracer", ["fx", "dynamic"])
def test_home_made_drop_path(style, tracer):
    torch.manual_seed(0)
    model = S.StochasticNet(style).eval()
    H.randomize_norms(model)
    x = P.images(4, seed=1)
    truth = H.ground_truth(model, x)
    assert truth.all_on == {"block.post"}
    # compare_mask's torch.rand(x.shape[0], ...) is not fx-traceable: the example traces it
    report = varshift.scan(model, x) if tracer == "fx" else rules.scan_graph(
        vgraph.dynamic_graph(model, x))
    assert report.traced_with == ("dynamic" if tracer == "dynamic" or style == "compare" else "fx")
    assert affected(report) == truth.all_on
    stochastic = [r for r in report.regularizers if r.kind == "stochastic"]
    assert len(stochastic) == 1
    reg = stochastic[0]
    fn = S.STYLES[style].__name__
    assert reg.name == f"block:{fn}" and reg.reaches == ["block.post"]
    assert "test_stochastic" not in reg.type and "stochastic_models.py:" in reg.type, reg.type
    assert reg.p == pytest.approx(0.3)
    finding = next(f for f in report.findings if f.regularizer == reg.name)
    assert finding.predicted_shift == pytest.approx(1 / 0.7)


@pytest.mark.parametrize("tracer", ["fx", "dynamic"])
def test_a_stochastic_op_keeps_its_op_and_line_apart(tracer):
    """The graph holds the op (``mul``) and its line as data; only the report joins them into
    its ``type`` (``mul at stochastic_models.py:N in drop_connect``)."""
    model, x = S.StochasticNet("drop_connect").eval(), P.images(2, seed=1)
    graph = vgraph.fx_graph(model) if tracer == "fx" else vgraph.dynamic_graph(model, x)
    [op] = [o for o in graph.ops if o.reg is not None and o.reg.kind == "stochastic"]
    assert op.behaviour is vgraph.Behaviour.RANDOM_OPERAND
    assert op.target == "mul" and op.name == "block:drop_connect"
    assert (os.path.basename(op.source.file), op.source.function) == (
        "stochastic_models.py", "drop_connect")
    [reg] = [r for r in rules.scan_graph(graph).regularizers if r.kind == "stochastic"]
    assert reg.type == f"mul at stochastic_models.py:{op.source.line} in drop_connect"
    assert reg.source == op.source
    # a regularizer recognized by name has no behaviour, and its type is its class
    plain = vgraph.fx_graph(M.ModuleDropoutBN())
    assert [(o.target, o.behaviour) for o in plain.ops if o.role == vgraph.REGULARIZER] == [
        ("Dropout", None)]


def test_probe_and_recalibrate_fix_a_home_made_drop_path():
    torch.manual_seed(0)
    model = P.warm_up(S.StochasticNet("inline"), P.chunks(P.images(160, seed=3), 16))
    data = P.chunks(P.images(64, seed=4), 16)
    before = varshift.probe(model, data)
    post = next(l for l in before.layers if l.name == "block.post")
    assert post.affected and post.shift > 1.1
    fixed, rep = varshift.recalibrate(model, data, exact=True)
    assert [l.name for l in rep.layers if l.recalibrated] == ["block.post"]
    after = varshift.probe(fixed, data)
    assert next(l for l in after.layers if l.name == "block.post").shift == pytest.approx(1, abs=1e-3)
    swapped, srep = varshift.swap(model)
    assert [e.swapped for e in srep.entries] == [False]


def test_class_name_suffix():
    report = varshift.scan(S.SuffixNet())
    assert [(r.name, r.kind, r.p) for r in report.regularizers] == [("path", "drop_path", 0.2)]
    assert affected(report) == {"bn"}


def test_layerdrop_scan_is_the_same_every_run():
    torch.manual_seed(0)
    model = S.LayerDropStack().eval()
    H.randomize_norms(model)
    x = P.images(2, seed=2)
    reports = []
    for seed in range(6):
        torch.manual_seed(seed)  # the caller's RNG must not matter
        reports.append(varshift.scan(model, x).to_dict())
    assert all(r == reports[0] for r in reports)
    names = [n["name"] for n in reports[0]["norms"]]
    assert names == ["layers.0.1", "layers.1.1", "layers.2.1", "out_bn"]  # every layer seen
    regs = [r for r in reports[0]["regularizers"] if r["kind"] == "stochastic"]
    assert [r["name"] for r in regs] == [":random_control_flow"]
    assert [r["type"] for r in regs] == ["random control flow"]
    # in the graph the decision is a structured op: what decided (a tensor's __bool__), where
    graph = vgraph.dynamic_graph(model, x)
    [op] = [o for o in graph.ops if o.behaviour is vgraph.Behaviour.RANDOM_CONTROL_FLOW]
    assert (op.name, op.target, op.role) == (":random_control_flow", "__bool__", "regularizer")
    assert op.source is not None and os.path.basename(op.source.file) == "stochastic_models.py"
    # skipping layer k changes the input of every later layer's BatchNorm, not layer 0's
    got = {n["name"] for n in reports[0]["norms"] if n["affected"]}
    assert got == {"layers.1.1", "layers.2.1", "out_bn"}
    truth = H.ground_truth(model, x)  # the root's own flag drives the decisions
    # running it, layer 0's BatchNorm "changes" only by not running at all when its layer is
    # skipped; whenever it runs, its input is the stem's output, as in eval mode
    assert truth.affected == got | {"layers.0.1"}


def test_sdpa_dropout_and_rnn_dropout():
    report = varshift.scan(S.Attention(), torch.randn(2, 5, 8))
    regs = [(r.name, r.kind, r.p, r.active) for r in report.regularizers]
    assert regs == [(":scaled_dot_product_attention", "dropout", 0.2, True)]
    assert affected(report) == {"bn"}
    assert not [f for f in report.findings if f.rule == "dropout-at-inference"]
    _, swapped = varshift.swap(S.Attention(), example_input=torch.randn(2, 5, 8))
    assert [(e.swapped, "dropout_p" in e.reason) for e in swapped.entries] == [(False, True)]
    report = varshift.scan(S.Recurrent(), torch.randn(2, 4, 5))
    assert [(r.name, r.p) for r in report.regularizers] == [("rnn:dropout", 0.25)]
    assert affected(report) == {"bn"}
    single = S.Recurrent()
    with pytest.warns(UserWarning, match="num_layers=1"):  # torch ignores the dropout then
        single.rnn = torch.nn.LSTM(5, 6, num_layers=1, dropout=0.25, batch_first=True)
    assert varshift.scan(single, torch.randn(2, 4, 5)).regularizers == []


def test_noise_at_inference_and_idle_draws_are_reported_for_what_they_are():
    report = varshift.scan(S.NoisyAlways(), P.images(2))
    assert report.traced_with == "dynamic"  # fx would run torch.rand(3) for real
    assert [f.rule for f in report.findings] == ["dropout-at-inference"]
    assert "every inference is random" in report.findings[0].message
    assert any("never reach the data path" in n and ":rand" in n for n in report.notes)


class Hidden(torch.nn.Module):
    """A train-mode op no rule can recognize: a random scale hidden behind a custom autograd
    Function's output is still seen... so hide it in a C-level op: torch.nn.functional.rrelu
    (random slopes in training, fixed in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.nn.functional.rrelu(self.conv(x) - 1, 0.0, 0.9, self.training))


def test_probe_names_an_unrecognized_train_mode_op():
    torch.manual_seed(0)
    model = P.warm_up(Hidden(), P.chunks(P.images(160, seed=3), 16))
    rep = varshift.probe(model, P.chunks(P.images(64, seed=3), 16))
    assert rep.layers[0].affected is False and rep.layers[0].shift > 1.25
    assert len(rep.warnings) == 1
    assert "an unrecognized train-mode op upstream is the likely cause" in rep.warnings[0]
    assert "not look like the training data" not in rep.warnings[0]
