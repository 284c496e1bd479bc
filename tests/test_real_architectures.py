"""`varshift.scan` on real torchvision and timm architectures, checked against running them.

The ground truth (``tests/arch_helpers.py``, which uses nothing from varshift) is what the
word means: a BatchNorm is affected by a regularizer iff its input changes when that
regularizer alone is switched to training mode, every other module (BatchNorms included)
staying in eval mode. From runs of each model the helpers find, without reading any graph:

* which modules own a regularizer (their own ``training`` flag changes their output: a
  ``Dropout``/``StochasticDepth``/``DropPath``/``DropBlock2d`` module, or a module whose
  ``forward`` calls ``F.dropout(..., training=self.training)``, DenseNet's ``_DenseLayer``),
* each owner's reach (the BatchNorms whose input changes with it alone on),
* each owner's direct norms (the same run with every BatchNorm's output pinned to its
  eval-mode value: what still changes is reached by a path through no BatchNorm),
* the affected norms with every regularizer on at once.

scan must give exactly these sets: ``affected``, each regularizer's ``reaches``, each
finding's ``direct``, each norm's ``direct`` and ``reached_by``. A functional regularizer
``owner:op`` is owned by the module ``owner``.

All models are built with random weights (``weights=None``); BatchNorm parameters and running
statistics are randomized so that no zero-initialized BatchNorm weight (timm's
``zero_init_last``) hides real dataflow from the numerical test. Inputs are small (64x64; 128x128
for the DropBlock model, see ``timm_resnet18_dropblock``). torch runs single-threaded here: on
the two shared cores of the CI machine two threads made these runs up to 30x slower.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

import varshift
from varshift.errors import TraceError

from arch_helpers import (
    GroundTruth,
    batch_norms,
    ground_truth,
    module_calls,
    owner_of,
    randomize_norms,
)

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.arch


@pytest.fixture(autouse=True, scope="module")
def _free_models():
    yield
    analysed.cache_clear()  # the built models


# --------------------------------------------------------------------------- models


def densenet121() -> nn.Module:
    return torchvision.models.densenet121(weights=None, drop_rate=0.2)


def efficientnet_b0() -> nn.Module:
    return torchvision.models.efficientnet_b0(weights=None)  # stochastic_depth_prob=0.2


def deeplabv3() -> nn.Module:
    # aux_loss adds the FCN head, whose Dropout(0.1) sits after its only BatchNorm.
    return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=True
    )


def mobilenet_v2() -> nn.Module:
    return torchvision.models.mobilenet_v2(weights=None)


def mobilenet_v3_small() -> nn.Module:
    return torchvision.models.mobilenet_v3_small(weights=None)


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None)


def convnext_tiny() -> nn.Module:
    return torchvision.models.convnext_tiny(weights=None)


def timm_resnet18_dropblock() -> nn.Module:
    """DropBlock (stages 3 and 4, block sizes 5 and 3) and drop path.

    At 128x128 input the DropBlock maps are 8x8 and 4x4. A mask can still drop nothing (and
    timm's rescale is then exactly 1.0): the ground truth retries other seeds for a
    regularizer that drew random numbers without changing its output (arch_helpers).
    """
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", drop_block_rate=0.2, drop_path_rate=0.1)


def timm_efficientnet_b0() -> nn.Module:
    """BatchNormAct2d (a BatchNorm2d subclass) everywhere, DropPath, a functional head dropout."""
    timm = pytest.importorskip("timm")
    return timm.create_model("efficientnet_b0", drop_path_rate=0.2, drop_rate=0.2)


def timm_mobilevit_xxs() -> nn.Module:
    """Not traceable by torch.fx: its MobileVitBlock branches on the feature map's size
    (``if new_h != H or new_w != W``), so scan needs an example input.

    BatchNormAct2d with DropBlock *inside* it (``...bn.drop``, timm's ``drop_layer``), DropPath
    and a functional head dropout.
    """
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "mobilevit_xxs", drop_block_rate=0.2, drop_path_rate=0.1, drop_rate=0.2
    )


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    size: int = 64
    fx: bool = True  # torch.fx traces it (else scan needs an example input)
    clean: bool = False  # no finding expected

    @property
    def id(self) -> str:
        return self.build.__name__


CASES = [
    Case(densenet121),
    Case(efficientnet_b0),
    Case(deeplabv3),
    Case(mobilenet_v2, clean=True),
    Case(mobilenet_v3_small, clean=True),
    Case(resnet18, clean=True),
    Case(convnext_tiny, clean=True),
    Case(timm_resnet18_dropblock, size=128),
    Case(timm_efficientnet_b0),
    Case(timm_mobilevit_xxs, fx=False),
]
BY_ID = {c.id: c for c in CASES}
PARAMS = [pytest.param(c.id, id=c.id) for c in CASES]


@dataclass
class Analysed:
    model: nn.Module
    x: torch.Tensor
    report: varshift.ScanReport
    truth: GroundTruth
    called_norms: set[str]


@functools.lru_cache(maxsize=None)
def analysed(case_id: str) -> Analysed:
    """Build the model once per session, scan it, and run the ground-truth experiments."""
    case = BY_ID[case_id]
    torch.manual_seed(0)
    model = case.build()
    randomize_norms(model)
    model.eval()
    x = torch.randn(2, 3, case.size, case.size)
    modes = [m.training for m in model.modules()]
    if case.fx:
        report = varshift.scan(model)
    else:
        report = varshift.scan(model, example_input=x[:1])
    assert [m.training for m in model.modules()] == modes  # scan restores every mode
    truth = ground_truth(model, x)
    called = {n for n in module_calls(model, x) if n in batch_norms(model)}
    return Analysed(model, x, report, truth, called)


def active_by_owner(report: varshift.ScanReport) -> dict[str, list]:
    out: dict[str, list] = {}
    for reg in report.regularizers:
        if reg.active:
            out.setdefault(owner_of(reg.name), []).append(reg)
    return out


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("case_id", PARAMS)
def test_norms_are_the_batchnorms_that_run(case_id: str) -> None:
    """Every BatchNorm the forward pass calls, subclasses included (timm's BatchNormAct2d)."""
    a = analysed(case_id)
    assert {n.name for n in a.report.norms} == a.called_norms
    modules = dict(a.model.named_modules())
    assert all(n.type == type(modules[n.name]).__name__ for n in a.report.norms)


@pytest.mark.parametrize("case_id", PARAMS)
def test_affected_equals_running_the_model(case_id: str) -> None:
    a = analysed(case_id)
    # The per-regularizer experiments explain everything the all-on run changes.
    assert a.truth.affected == a.truth.all_on
    assert {n.name for n in a.report.norms if n.affected} == a.truth.all_on
    assert a.report.summary["affected_norms"] == len(a.truth.all_on)


@pytest.mark.parametrize("case_id", PARAMS)
def test_active_regularizers_are_the_modules_whose_mode_matters(case_id: str) -> None:
    a = analysed(case_id)
    assert set(active_by_owner(a.report)) == set(a.truth.owners)
    # An inactive one (p=0, e.g. the first block's stochastic depth) changes nothing.
    inactive = {owner_of(r.name) for r in a.report.regularizers if not r.active}
    assert not inactive & set(a.truth.owners)


@pytest.mark.parametrize("case_id", PARAMS)
def test_each_regularizer_reaches_what_it_changes(case_id: str) -> None:
    a = analysed(case_id)
    for owner, regs in active_by_owner(a.report).items():
        reaches = set().union(*(r.reaches for r in regs))
        assert reaches == a.truth.reach[owner], owner


@pytest.mark.parametrize("case_id", PARAMS)
def test_direct_norms_are_reached_through_no_other_norm(case_id: str) -> None:
    a = analysed(case_id)
    direct: dict[str, set[str]] = {}
    for f in a.report.findings:
        if f.rule == "regularizer-before-norm":
            direct.setdefault(owner_of(f.regularizer), set()).update(f.direct)
    expected = {o: d for o, d in a.truth.direct.items() if d}
    assert direct == expected
    assert {n.name for n in a.report.norms if n.direct} == a.truth.any_direct


@pytest.mark.parametrize("case_id", PARAMS)
def test_reached_by_lists_the_regularizers_that_change_the_norm(case_id: str) -> None:
    a = analysed(case_id)
    for norm in a.report.norms:
        expected = {o for o, reach in a.truth.reach.items() if norm.name in reach}
        assert {owner_of(r) for r in norm.reached_by} == expected, norm.name


@pytest.mark.parametrize("case_id", PARAMS)
def test_findings(case_id: str) -> None:
    case, a = BY_ID[case_id], analysed(case_id)
    if case.clean:
        assert a.report.findings == []
        assert bool(a.report)
        assert not a.truth.all_on
        return
    assert a.truth.all_on  # the ground truth is not vacuous
    # One finding per regularizer that reaches a norm, in the report's order.
    shifting = [r.name for r in a.report.regularizers if r.active and r.reaches]
    assert [f.regularizer for f in a.report.findings] == shifting
    for f in a.report.findings:
        reg = next(r for r in a.report.regularizers if r.name == f.regularizer)
        assert f.downstream_count == len(reg.reaches)
        assert f.predicted_shift == pytest.approx(1.0 / (1.0 - reg.p))


@pytest.mark.parametrize("case_id", [p for p in PARAMS if BY_ID[p.values[0]].fx])
def test_dynamic_tracer_gives_the_same_report(case_id: str) -> None:
    """The trace scan falls back to when fx fails must agree with fx on these models."""
    from varshift.graph import dynamic_graph
    from varshift.rules import scan_graph

    a = analysed(case_id)
    dyn = scan_graph(dynamic_graph(a.model, a.x[:1]), type(a.model).__name__).to_dict()
    fx = a.report.to_dict()
    for key in ("regularizers", "norms", "findings"):
        assert dyn[key] == fx[key], key


# --------------------------------------------------------------------------- specifics


def test_untraceable_model_needs_an_example_input() -> None:
    a = analysed("timm_mobilevit_xxs")
    with pytest.raises(TraceError, match="`input_shape`"):
        varshift.scan(a.model)
    assert a.report.traced_with == "dynamic"
    assert any("could not trace" in note for note in a.report.notes)
    # A regularizer nested inside a norm is seen (and reaches the norms after its host).
    nested = [r for r in a.report.regularizers if ".bn.drop" in r.name]
    assert nested and all(r.kind == "dropblock" for r in nested)
    assert any(r.reaches for r in nested)


def test_densenet_regularizers_are_functional_dropouts_named_by_their_layer() -> None:
    a = analysed("densenet121")
    layers = [n for n, m in a.model.named_modules() if type(m).__name__ == "_DenseLayer"]
    assert len(layers) == 6 + 12 + 24 + 16
    got = [(r.name, r.kind, r.type, r.p, r.active, r.functional) for r in a.report.regularizers]
    assert got == [(f"{n}:dropout", "dropout", "dropout", pytest.approx(0.2), True, True)
                   for n in layers]
    assert got[2][0] == "features.denseblock1.denselayer3:dropout"
    # The stem's norm and denselayer1's norm1 and norm2 precede every dropout.
    unaffected = [n.name for n in a.report.norms if not n.affected]
    assert unaffected == [
        "features.norm0",
        "features.denseblock1.denselayer1.norm1",
        "features.denseblock1.denselayer1.norm2",
    ]


def test_efficientnet_regularizers_are_stochastic_depth_modules() -> None:
    """p follows torchvision's linear rule, 0.2 * k / 16 for MBConv block k; only blocks with
    a residual connection call their StochasticDepth."""
    a = analysed("efficientnet_b0")
    called = set(module_calls(a.model, a.x))
    blocks = [n for n, m in a.model.named_modules() if type(m).__name__ == "MBConv"]
    assert len(blocks) == 16
    expected = [
        (f"{b}.stochastic_depth", "drop_path", "StochasticDepth", pytest.approx(0.2 * k / 16),
         True, False)
        for k, b in enumerate(blocks)
        if f"{b}.stochastic_depth" in called
    ]
    expected.append(("classifier.0", "dropout", "Dropout", pytest.approx(0.2), True, False))
    got = [(r.name, r.kind, r.type, r.p, r.active, r.functional) for r in a.report.regularizers]
    assert got == expected
    assert len(expected) == 9 + 1
    assert next(r for r in a.report.regularizers if r.name == "classifier.0").reaches == []


def test_timm_regularizer_kinds() -> None:
    a = analysed("timm_resnet18_dropblock")
    kinds = {r.name: (r.kind, r.type) for r in a.report.regularizers}
    assert kinds["layer3.0.drop_block"] == ("dropblock", "DropBlock2d")
    assert kinds["layer4.1.drop_block"] == ("dropblock", "DropBlock2d")
    assert kinds["layer1.1.drop_path"] == ("drop_path", "DropPath")
    # the DropBlocks after bn1 reach bn2 of their own block first
    finding = next(f for f in a.report.findings if f.regularizer == "layer3.0.drop_block")
    assert finding.direct == ["layer3.0.bn2"]
    b = analysed("timm_efficientnet_b0")
    assert {n.type for n in b.report.norms} == {"BatchNormAct2d"}
    # timm's head calls F.dropout in the root module's forward: the owner is the root, "".
    head = b.report.regularizers[-1]
    assert (head.name, head.functional, head.reaches) == (":dropout", True, [])


def test_clean_models_list_their_classifier_dropout() -> None:
    for case_id, name in (("mobilenet_v2", "classifier.0"), ("mobilenet_v3_small", "classifier.2")):
        regs = analysed(case_id).report.regularizers
        assert [(r.name, r.kind, r.active, r.reaches) for r in regs] == [
            (name, "dropout", True, [])
        ]
    assert analysed("resnet18").report.regularizers == []
    convnext = analysed("convnext_tiny").report
    assert convnext.norms == [] and len(convnext.regularizers) == 18
