"""`varshift.scan` on one tiny model per pattern: the exact ground truth, both tracers.

Each case lists every regularizer (name, kind, p, active, reaches), every norm (name, type,
affected, direct, reached_by) and every finding (rule, severity, regularizer, direct,
downstream_count, predicted_shift). The predicted shifts are computed here from p, not read
from varshift. Where it makes sense the graph answer is checked against running the model:
a BatchNorm is affected iff its input changes when the regularizers are switched to training
mode while every norm stays in eval mode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import varshift
from varshift import graph as vgraph
from varshift import rules
from varshift.errors import TraceError

from fixtures import models as M

ERR, WARN, INFO = "error", "warning", "info"
RULE = "regularizer-before-norm"
AT_INFERENCE = "dropout-at-inference"


def dropout_shift(p: float) -> float:
    """The paper's zero-mean estimate for inverted dropout: Var x 1/(1-p)."""
    return 1.0 / (1.0 - p)


def uout_shift(beta: float) -> float:
    """Uout x + x*r, r ~ U(-beta, beta): Var x (1 + E[r^2]) = 1 + beta^2/3."""
    return 1.0 + beta**2 / 3.0


@dataclass
class Case:
    factory: type
    regs: list[tuple]  # (name, kind, p, active, reaches)
    norms: list[tuple]  # (name, type, affected, direct, reached_by)
    findings: list[tuple]  # (rule, severity, regularizer, direct, downstream_count, shift)
    fx: bool = True  # torch.fx can trace it
    runtime_check: bool = True  # the run-the-model oracle applies
    types: dict = field(default_factory=dict)  # regularizer name -> type column

    @property
    def id(self) -> str:
        return self.factory.__name__


CASES = [
    Case(
        M.ModuleDropoutBN,
        regs=[("drop", "dropout", 0.2, True, ["bn1", "bn2"])],
        norms=[
            ("bn0", "BatchNorm2d", False, False, []),
            ("bn1", "BatchNorm2d", True, True, ["drop"]),
            ("bn2", "BatchNorm2d", True, False, ["drop"]),
        ],
        findings=[(RULE, ERR, "drop", ["bn1"], 2, dropout_shift(0.2))],
        types={"drop": "Dropout"},
    ),
    Case(
        M.FunctionalDropoutBN,
        regs=[("block:dropout", "dropout", 0.3, True, ["bn"])],
        norms=[("bn", "BatchNorm2d", True, True, ["block:dropout"])],
        findings=[(RULE, ERR, "block:dropout", ["bn"], 1, dropout_shift(0.3))],
        types={"block:dropout": "dropout"},
    ),
    Case(
        M.Dropout2dBN,
        regs=[("drop", "channel_dropout", 0.05, True, ["bn"])],
        norms=[("bn", "BatchNorm2d", True, True, ["drop"])],
        findings=[(RULE, WARN, "drop", ["bn"], 1, dropout_shift(0.05))],
        types={"drop": "Dropout2d"},
    ),
    Case(
        M.AlphaDropoutBN,
        regs=[("drop", "alpha_dropout", 0.1, True, ["bn"])],
        norms=[("bn", "BatchNorm1d", True, True, ["drop"])],
        # Alpha dropout keeps mean and variance of SELU-standardized inputs (estimate 1.0),
        # but the risk is real for other inputs: at least a warning.
        findings=[(RULE, WARN, "drop", ["bn"], 1, 1.0)],
        types={"drop": "AlphaDropout"},
    ),
    Case(
        M.DropPathResidual,
        regs=[("drop_path", "drop_path", 0.2, True, ["bn"])],
        norms=[("bn", "BatchNorm2d", True, True, ["drop_path"])],
        findings=[(RULE, ERR, "drop_path", ["bn"], 1, dropout_shift(0.2))],
        types={"drop_path": "DropPath"},
    ),
    Case(
        M.DropBlockBN,
        regs=[("dropblock", "dropblock", 0.1, True, ["bn"])],
        norms=[("bn", "BatchNorm2d", True, True, ["dropblock"])],
        findings=[(RULE, ERR, "dropblock", ["bn"], 1, dropout_shift(0.1))],
        types={"dropblock": "DropBlock2d"},
    ),
    Case(
        M.ResidualAdd,
        regs=[("drop", "dropout", 0.25, True, ["bn"])],
        norms=[
            ("skip_bn", "BatchNorm2d", False, False, []),
            ("bn", "BatchNorm2d", True, True, ["drop"]),
        ],
        findings=[(RULE, ERR, "drop", ["bn"], 1, dropout_shift(0.25))],
    ),
    Case(
        M.ConcatBN,
        regs=[("drop", "dropout", 0.5, True, ["bn"])],
        norms=[
            ("bn_a", "BatchNorm2d", False, False, []),
            ("bn", "BatchNorm2d", True, True, ["drop"]),
        ],
        findings=[(RULE, ERR, "drop", ["bn"], 1, dropout_shift(0.5))],
    ),
    Case(
        M.SharedDropout,
        regs=[("drop", "dropout", 0.2, True, ["bn1", "bn3"])],
        norms=[
            ("bn0", "BatchNorm2d", False, False, []),
            ("bn1", "BatchNorm2d", True, True, ["drop"]),
            ("bn2", "BatchNorm2d", False, False, []),
            ("bn3", "BatchNorm2d", True, True, ["drop"]),
        ],
        findings=[(RULE, ERR, "drop", ["bn1", "bn3"], 2, dropout_shift(0.2))],
    ),
    Case(
        M.SharedNorm,
        regs=[("drop", "dropout", 0.2, True, ["bn", "bn_out"])],
        norms=[
            ("bn", "BatchNorm2d", True, True, ["drop"]),
            ("bn_out", "BatchNorm2d", True, False, ["drop"]),
        ],
        findings=[(RULE, ERR, "drop", ["bn"], 2, dropout_shift(0.2))],
    ),
    Case(
        M.InactiveDropout,
        # Inactive regularizers are listed with the norms they would reach, but reach no
        # norm's ``reached_by`` and raise no finding.
        regs=[
            ("drop", "dropout", 0.0, False, ["bn0", "bn1"]),
            ("off:dropout", "dropout", 0.3, False, ["bn1"]),
        ],
        norms=[("bn0", "BatchNorm2d", False, False, []), ("bn1", "BatchNorm2d", False, False, [])],
        findings=[],
    ),
    Case(
        M.DropoutHead,
        regs=[("drop", "dropout", 0.5, True, [])],
        norms=[("bn", "BatchNorm2d", False, False, [])],
        findings=[],
    ),
    Case(
        M.LayerNormModel,
        regs=[("drop", "dropout", 0.3, True, [])],
        norms=[],
        findings=[],
    ),
    Case(
        M.GroupNormModel,
        regs=[("drop", "channel_dropout", 0.3, True, [])],
        norms=[],
        findings=[],
    ),
    Case(
        M.SubclassBN,
        regs=[("drop", "dropout", 0.2, True, ["bn"])],
        norms=[("bn", "MyBN", True, True, ["drop"])],
        findings=[(RULE, ERR, "drop", ["bn"], 1, dropout_shift(0.2))],
    ),
    Case(
        M.AlwaysOnDropout,
        # Random at inference; bn1 sees dropout in training *and* at inference, so its
        # statistics are not shifted: no regularizer-before-norm finding, bn1 not affected.
        regs=[("head:dropout", "dropout", 0.2, True, ["bn1"])],
        norms=[("bn0", "BatchNorm2d", False, False, []), ("bn1", "BatchNorm2d", False, False, [])],
        findings=[(AT_INFERENCE, ERR, "head:dropout", ["bn1"], 1, None)],
        runtime_check=False,  # the eval-mode run is random too
    ),
    Case(
        M.DataDependent,
        regs=[("drop", "dropout", 0.2, True, ["bn"])],
        norms=[("bn", "BatchNorm2d", True, True, ["drop"])],
        findings=[(RULE, ERR, "drop", ["bn"], 1, dropout_shift(0.2))],
        fx=False,
    ),
    Case(
        M.ShapeOnly,
        regs=[("drop", "dropout", 0.4, True, [])],
        norms=[("bn", "BatchNorm2d", False, False, [])],
        findings=[],
    ),
    Case(
        M.UoutBN,
        regs=[("uout", "uout", 0.1, True, ["bn"])],
        norms=[("bn", "BatchNorm2d", True, True, ["uout"])],
        findings=[(RULE, INFO, "uout", ["bn"], 1, uout_shift(0.1))],
        types={"uout": "Uout"},
    ),
]


def build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = case.factory()
    return model, M.example(getattr(model, "input_shape", M.INPUT_SHAPE))


def scan_with(tracer: str, model: nn.Module, x: torch.Tensor):
    """``fx``: the public ``varshift.scan``; ``dynamic``: the run-once tracer directly."""
    if tracer == "fx":
        report = varshift.scan(model)
        assert report.traced_with == "fx"
        return report
    report = rules.scan_graph(vgraph.dynamic_graph(model, x), type(model).__name__)
    assert report.traced_with == "dynamic"
    return report


def case_params():
    for case in CASES:
        for tracer in ("fx", "dynamic"):
            if tracer == "fx" and not case.fx:
                continue
            yield pytest.param(case, tracer, id=f"{case.id}-{tracer}")


# --------------------------------------------------------------------------- runtime oracle


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm-family layers by isinstance (independent of varshift.kinds)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


@torch.no_grad()
def _norm_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0]))
        for n, m in _batchnorms(model).items()
    ]
    try:
        torch.manual_seed(1)
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def runtime_affected(model: nn.Module, x: torch.Tensor, switch_on=None) -> set[str]:
    """Norms whose input changes when regularizers go to training mode, norms kept in eval.

    ``switch_on``: the one module whose ``training`` flag is set (a single regularizer, or
    the owner of a functional one); default: every non-norm module.
    """
    model = copy.deepcopy(model).eval()
    before = _norm_inputs(model, x)
    if switch_on is None:
        model.train()
        for m in _batchnorms(model).values():
            m.eval()
    else:
        model.get_submodule(switch_on).training = True  # this module only, not its children
    after = _norm_inputs(model, x)
    assert before.keys() == after.keys()
    return {
        n for n in before
        if any(not torch.equal(a, b) for a, b in zip(before[n], after[n], strict=True))
    }


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("case,tracer", list(case_params()))
def test_ground_truth(case: Case, tracer: str) -> None:
    model, x = build(case)
    report = scan_with(tracer, model, x)

    got_regs = [(r.name, r.kind, r.p, r.active, r.reaches) for r in report.regularizers]
    assert got_regs == [
        (name, kind, pytest.approx(p), active, reaches) for name, kind, p, active, reaches in case.regs
    ]
    for name, type_ in case.types.items():
        assert next(r for r in report.regularizers if r.name == name).type == type_
    assert [(n.name, n.type, n.affected, n.direct, n.reached_by) for n in report.norms] == case.norms

    got_findings = [
        (f.rule, f.severity, f.regularizer, f.direct, f.downstream_count, f.predicted_shift)
        for f in report.findings
    ]
    expected = [
        (rule, sev, reg, direct, count, None if shift is None else pytest.approx(shift, rel=1e-9))
        for rule, sev, reg, direct, count, shift in case.findings
    ]
    assert got_findings == expected

    # Consistency of the JSON view with the objects and the summary.
    doc = report.to_dict()
    assert doc["summary"]["affected_norms"] == sum(n[2] for n in case.norms)
    assert doc["summary"]["findings"] == len(case.findings)
    assert bool(report) == (not any(f[1] == ERR for f in case.findings))


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id) for c in CASES if c.runtime_check]
)
def test_affected_matches_running_the_model(case: Case) -> None:
    model, x = build(case)
    expected = {name for name, _, affected, _, _ in case.norms if affected}
    assert runtime_affected(model, x) == expected  # the fixture encodes what it claims
    if case.fx:
        report = varshift.scan(model)
    else:
        report = varshift.scan(model, example_input=x)
    assert {n.name for n in report.norms if n.affected} == expected


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id) for c in CASES if c.runtime_check and c.fx]
)
def test_each_regularizer_reaches_what_running_it_changes(case: Case) -> None:
    """Per regularizer: switching on just it changes exactly the norms in ``reaches``."""
    model, x = build(case)
    report = varshift.scan(model)
    for reg in report.regularizers:
        if not reg.active:
            continue
        owner = reg.name.split(":")[0] if reg.functional else reg.name
        assert runtime_affected(model, x, switch_on=owner) == set(reg.reaches), reg.name


# --------------------------------------------------------------------------- specifics


def test_functional_name_owner_and_repeats() -> None:
    """``owner:op`` names, ``_1`` for a repeat in one owner, ``:op`` for the root's forward."""
    import torch.nn.functional as F

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = M.conv(3, 8)
            self.bn = nn.BatchNorm2d(8)
            self.p = 0.2

        def forward(self, x):
            x = F.dropout(self.conv(x), p=self.p, training=self.training)  # keywords
            x = torch.dropout(x, 0.1, self.training)  # the ATen binding
            return self.bn(F.dropout2d(x, 0.1, self.training))

    model = Root()
    for report in (
        varshift.scan(model),
        rules.scan_graph(vgraph.dynamic_graph(model, M.example()), "Root"),
    ):
        assert [(r.name, r.kind, r.p, r.functional) for r in report.regularizers] == [
            (":dropout", "dropout", pytest.approx(0.2), True),
            (":dropout_1", "dropout", pytest.approx(0.1), True),
            (":dropout2d", "channel_dropout", pytest.approx(0.1), True),
        ]
        assert report.norms[0].reached_by == [":dropout", ":dropout_1", ":dropout2d"]


def test_functional_dropout_without_training_flag_is_on_at_inference() -> None:
    """``F.dropout(x, p)`` defaults to training=True: the classic inference bug."""
    import torch.nn.functional as F

    class Forgot(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = M.conv(3, 8)

        def forward(self, x):
            return F.dropout(self.conv(x), 0.1)

    report = varshift.scan(Forgot())
    assert [(f.rule, f.severity, f.regularizer) for f in report.findings] == [
        (AT_INFERENCE, ERR, ":dropout")
    ]
    assert report.regularizers[0].always_on is True
    assert not report


def test_untraceable_model_needs_input_shape() -> None:
    model, x = build(next(c for c in CASES if c.factory is M.DataDependent))
    with pytest.raises(TraceError, match="`input_shape`") as caught:
        varshift.scan(model)
    # the library names its parameters; the command line reads them as the old flags
    from varshift.cli.terms import flags

    assert "; pass --input-shape (for example --input-shape 1,3,224,224) or --data so " in flags(
        str(caught.value))
    report = varshift.scan(model, example_input=x)
    assert report.traced_with == "dynamic"
    assert any("(4, 3, 8, 8)" in note for note in report.notes)
    assert [f.regularizer for f in report.findings] == ["drop"]


def test_model_that_does_not_run_on_the_example_input() -> None:
    model = M.DataDependent()
    with pytest.raises(TraceError, match=r"shape \(1, 5, 8, 8\)"):
        varshift.scan(model, example_input=torch.randn(1, 5, 8, 8))


@pytest.mark.parametrize("tracer", ["fx", "dynamic"])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_scan_leaves_model_untouched(tracer: str, mode: str) -> None:
    torch.manual_seed(0)
    model = M.SharedNorm()
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn.eval()
        model.drop.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    if tracer == "fx":
        varshift.scan(model)
    else:
        rules.scan_graph(vgraph.dynamic_graph(model, M.example()))

    assert {n: m.training for n, m in model.named_modules()} == modes
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k  # running stats and num_batches_tracked included
    assert torch.equal(torch.get_rng_state(), rng)


def test_severity_thresholds_follow_the_predicted_shift() -> None:
    """error at >= 1.10x, warning at >= 1.01x, info below (Dropout2d p chosen around them)."""
    expected = {0.005: INFO, 0.0099: INFO, 0.0099999: WARN, 0.05: WARN, 0.0909: WARN, 0.1: ERR,
                0.5: ERR}
    for p, severity in expected.items():
        report = varshift.scan(M.Dropout2dBN(p))
        (finding,) = report.findings
        assert finding.predicted_shift == pytest.approx(dropout_shift(p))
        want = ERR if dropout_shift(p) >= 1.10 else WARN if dropout_shift(p) >= 1.01 else INFO
        assert finding.severity == want == severity, p


def test_report_bool_and_fail_on() -> None:
    errors = varshift.scan(M.ModuleDropoutBN())
    warns = varshift.scan(M.Dropout2dBN())
    infos = varshift.scan(M.UoutBN())
    clean = varshift.scan(M.DropoutHead())
    assert not errors and warns and infos and clean
    assert [r.failed("warning") for r in (errors, warns, infos, clean)] == [True, True, False, False]
    assert [r.failed("never") for r in (errors, warns, infos, clean)] == [False] * 4


# --------------------------------------------------------------------------- in-place ops and known graph bugs


@pytest.mark.parametrize("tracer", ["fx", "dynamic"])
def test_dropout_inside_a_composite_torch_layer(tracer: str) -> None:
    """torch's composite layers stay leaves; the dropouts inside them (submodules, and
    MultiheadAttention's ``dropout`` attribute) act on the layer's output."""
    torch.manual_seed(0)
    model, x = M.TransformerThenBN(), torch.randn(4, 5, 16)
    assert runtime_affected(model, x) == {"bn"}
    graph = vgraph.fx_graph(model) if tracer == "fx" else vgraph.dynamic_graph(model, x)
    report = rules.scan_graph(graph)
    assert [n.affected for n in report.norms] == [True]
    names = {r.name: r for r in report.regularizers}
    attn = [n for n in names if n.endswith("self_attn:dropout")]
    assert len(attn) == 1 and names[attn[0]].p == model.enc.self_attn.dropout
    modules = {n for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert modules <= set(names)
    assert all(names[n].reaches == ["bn"] for n in names)


class InplaceMethodAdd(nn.Module):
    """``y.add_(dropout(x))`` mutates y, then y feeds the BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = M.conv(3, 8)
        self.conv1 = M.conv()
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.conv0(x)
        y = self.conv1(x)
        y.add_(self.drop(x))
        return self.bn(y)


class ViewCopy(nn.Module):
    """Writes dropout output into a view of y (``y.narrow(...).copy_(...)``), then bn(y)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = M.conv(3, 8)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.conv(x)
        y = x.clone()
        y.narrow(1, 0, 2).copy_(self.drop(x)[:, :2])
        return self.bn(y)


def test_inplace_method_dynamic() -> None:
    model = InplaceMethodAdd()
    assert runtime_affected(model, M.example()) == {"bn"}
    report = rules.scan_graph(vgraph.dynamic_graph(model, M.example()))
    assert [n.affected for n in report.norms] == [True]


def test_inplace_method_fx() -> None:
    """fx nodes are values: after ``y.add_(d)`` later uses of y must carry the write."""
    report = varshift.scan(InplaceMethodAdd())
    assert [n.affected for n in report.norms] == [True]


@pytest.mark.parametrize("tracer", ["fx", "dynamic"])
def test_inplace_write_through_a_view(tracer: str) -> None:
    """A write into a view (``y.narrow(...).copy_(d)``) is a write into its base y."""
    model = ViewCopy()
    assert runtime_affected(model, M.example()) == {"bn"}
    if tracer == "fx":
        report = varshift.scan(model)
    else:
        report = rules.scan_graph(vgraph.dynamic_graph(model, M.example()))
    assert [n.affected for n in report.norms] == [True]


@pytest.mark.parametrize(
    "norm,is_norm",
    [
        (lambda: nn.BatchNorm2d(8), True),
        (lambda: nn.SyncBatchNorm(8), True),
        (lambda: nn.LazyBatchNorm2d(), True),
        (lambda: M.MyBN(8), True),
        (lambda: nn.BatchNorm2d(8, track_running_stats=False), False),  # batch stats always
        (lambda: nn.GroupNorm(2, 8), False),
        (lambda: nn.InstanceNorm2d(8), False),
        (lambda: nn.LayerNorm([8, 8, 8]), False),
    ],
    ids=["BatchNorm2d", "SyncBatchNorm", "LazyBatchNorm2d", "subclass", "no-running-stats",
         "GroupNorm", "InstanceNorm2d", "LayerNorm"],
)
def test_which_layers_are_norms(norm, is_norm: bool) -> None:
    model = nn.Sequential(M.conv(3, 8), nn.Dropout(0.2), M.conv(), norm())
    report = varshift.scan(model)
    assert [(n.name, n.affected, n.direct) for n in report.norms] == (
        [("3", True, True)] if is_norm else []
    )
    batch_stats = isinstance(model[3], nn.BatchNorm2d) and not model[3].track_running_stats
    assert [f.rule for f in report.findings] == (
        ["regularizer-before-norm"] if is_norm else
        ["norm-without-running-stats"] if batch_stats else [])  # #9: a finding of its own


# --------------------------------------------------------------------------- the package


def test_the_graph_package_reexports_its_modules_names() -> None:
    """``varshift.graph`` is a façade over model/builder/fx/dynamic/stochastic: its functions
    are functions (no submodule of the same name shadows one), and the fx tracer's class keeps
    the qualified name that GraphModules saved by `swap` spell."""
    import io
    import pickle
    import types

    for name in ("dynamic_graph", "fx_graph", "fx_graph_module", "fx_owner", "trace",
                 "mark_stochastic", "is_leaf", "_fx_trace"):
        assert isinstance(getattr(vgraph, name), types.FunctionType), name
    for name in ("Op", "DataflowGraph", "Namer", "Behaviour", "_LeafTracer"):
        assert isinstance(getattr(vgraph, name), type), name
    assert vgraph.kinds.STOCHASTIC == "stochastic" and callable(vgraph.sources.caller_location)
    assert vgraph._LeafTracer.__module__ == "varshift.graph"
    assert b"varshift.graph\n_LeafTracer" in pickle.dumps(vgraph._LeafTracer, protocol=2)
    swapped, _ = varshift.swap(M.FunctionalDropoutBN())
    assert isinstance(swapped, torch.fx.GraphModule)
    buf = io.BytesIO()
    torch.save(swapped, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._tracer_cls is vgraph._LeafTracer


def test_the_graph_imports_none_of_the_stages_that_read_it() -> None:
    """graph/ is read by rules/, measure/, fix/ and report/, and imports none of them."""
    import subprocess
    import sys

    code = ("import sys, varshift.graph; print(' '.join(sorted(m for m in sys.modules if "
            "m.split('.')[:2][-1] in ('rules', 'measure', 'fix', 'report', 'reports'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
