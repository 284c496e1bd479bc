"""The calling convention (varshift.calling): how a model is called on a batch, and where the
metrics read its output. Real models that take two inputs, keyword inputs and token ids, and
return dicts; ground truth from running them (tests/arch_helpers.py)."""

from __future__ import annotations

import itertools
import textwrap

import pytest
import torch
import torch.nn as nn

import varshift
from varshift.calling import Caller, cut, batch_size
from varshift.data import load_data
from varshift.errors import DataError

import arch_helpers as H
from fixtures import calling_models as C


def affected(report) -> set[str]:
    return {n.name for n in report.norms if n.affected}


def check_fixed(model, batches, **kw) -> None:
    """recalibrate --exact, then probe: every recalibrated layer at 1.000 +- 1e-3."""
    before = varshift.probe(model, batches, **kw)
    assert max(l.shift for l in before.layers) > 1.05  # dropout left a real shift to fix
    fixed, rep = varshift.recalibrate(model, batches, exact=True, **kw)
    after = varshift.probe(fixed, batches, **kw)
    done = {l.name for l in rep.layers if l.recalibrated}
    assert done
    for layer in after.layers:
        if layer.name in done:
            assert layer.shift == pytest.approx(1.0, abs=1e-3), layer
    return rep


# --------------------------------------------------------------------------- real models


def test_two_inputs_from_a_dict_batch(tmp_path):
    model = C.image_tabular()
    batches = C.image_tabular_batches()
    first = batches[0]
    truth = H.ground_truth(model, {"image": first["image"], "tabular": first["tabular"]})
    assert truth.all_on == {"tab_bn", "head_bn"}
    scan = varshift.scan(model, first)
    assert affected(scan) == truth.all_on
    rep = check_fixed(model, batches)
    # metrics read the labels held back from the dict
    assert rep.before is not None and rep.before.samples == 96
    result = varshift.export_onnx(model, tmp_path / "two.onnx", batches=batches)
    assert result, result.checks
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(str(tmp_path / "two.onnx")).get_inputs()]
    assert names == ["image", "tabular"]


def test_tuple_batches_go_in_as_positional_arguments():
    model = C.image_tabular()
    dicts = C.image_tabular_batches()
    triples = [(b["image"], b["tabular"], b["label"]) for b in dicts]  # inputs, then labels
    pairs = [(b["image"], b["tabular"]) for b in dicts]  # forward takes exactly two
    ref = varshift.probe(model, dicts)
    for batches in (triples, pairs, [((b["image"], b["tabular"]), b["label"]) for b in dicts]):
        got = varshift.probe(model, batches)
        assert got.to_dict()["layers"] == ref.to_dict()["layers"]
    _, rep = varshift.recalibrate(model, triples, measure=True)
    assert rep.before is not None and rep.before.samples == 96  # the last item: labels
    _, rep = varshift.recalibrate(model, pairs, measure=True)
    assert rep.before is None  # no labels


class MaskedNet(nn.Module):
    """``forward(x, mask=None)``: a pair (x, mask) is ambiguous with (inputs, labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, mask=None):
        h = self.fc(x)
        if mask is not None:
            h = h * mask
        return self.head(self.bn(self.drop(h)))


def test_labels_option_settles_ambiguous_pairs():
    model = MaskedNet().eval()
    x, mask = torch.randn(8, 4), torch.full((8, 6), 2.0)
    auto = Caller(model).prepare((x, mask))
    assert len(auto.args) == 1 and auto.labels is mask  # (inputs, labels) as before
    none = Caller(model, labels="none").prepare((x, mask))
    assert len(none.args) == 2 and none.labels is None
    y = torch.arange(8) % 3
    last = Caller(model, labels="last").prepare((x, mask, y))
    assert len(last.args) == 2 and torch.equal(last.labels, y)
    # file data without labels comes as (x, None): never a None argument
    for mode in ("auto", "none", "last"):
        inv = Caller(model, labels=mode).prepare((x, None))
        assert len(inv.args) == 1 and inv.labels is None
    # the mask really goes in: the BN input doubles
    rep_none = varshift.probe(model, [(x, mask)], labels="none")
    rep_auto = varshift.probe(model, [(x, mask)])
    assert rep_none.layers[0].eval_var_mean == pytest.approx(4 * rep_auto.layers[0].eval_var_mean)


def test_dict_output_metrics_read_logits_and_output_key():
    model = C.dict_out()
    g = C.gen(3)
    x = torch.randn(40, 6, generator=g) + 1
    y = model(x)["logits"].argmax(1)  # labels the model gets right
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    rep = check_fixed(model, batches)
    assert rep.before.accuracy == 1.0
    logits = model(x)["logits"].double()
    nll = torch.nn.functional.cross_entropy(logits, y).item()
    assert rep.before.nll == pytest.approx(nll, rel=1e-6)
    # --output-key embedding: 12 "classes"; labels < 12, so the metrics are read from there
    _, rep2 = varshift.recalibrate(model, batches, output_key="embedding")
    emb = model(x)["embedding"].double()
    assert rep2.before.nll == pytest.approx(
        torch.nn.functional.cross_entropy(emb, y).item(), rel=1e-6)
    with pytest.raises(DataError, match="`output_key` 'scores' is not in the model's output "
                                        r"\(keys: embedding, logits\)"):
        varshift.recalibrate(model, batches, output_key="scores")


def test_dict_output_exports_every_output(tmp_path):
    model = C.dict_out()
    x = torch.randn(12, 6, generator=C.gen(4))
    result = varshift.export_onnx(model, tmp_path / "d.onnx", batches=[(x, None)])
    assert result, result.checks
    assert result.outputs == 2 and result.batch_sizes == [1, 7, 12]
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "d.onnx")).run(None, {"input": x[:5].numpy()})
    want = model(x[:5])
    assert [g.shape for g in got] == [(5, 12), (5, 4)]
    assert all(abs(g - w.detach().numpy()).max() < 1e-4
               for g, w in zip(got, (want["embedding"], want["logits"])))


def test_integer_inputs_keep_their_dtype_floats_take_the_models():
    model = C.tokens().double()
    batches = C.token_batches()
    inv = Caller(model).prepare(batches[0])
    assert inv.kwargs["input_ids"].dtype == torch.int64
    assert inv.kwargs["attention_mask"].dtype == torch.float64
    assert "labels" not in inv.kwargs and inv.labels.dtype == torch.int64
    truth = H.ground_truth(model, {k: batches[0][k] for k in ("input_ids", "attention_mask")}
                           | {"attention_mask": batches[0]["attention_mask"].double()})
    assert affected(varshift.scan(model, batches[0])) == truth.all_on == {"bn"}
    check_fixed(model, batches)


def test_call_function_returning_output_and_labels():
    model = C.image_tabular()
    data = [(b["tabular"], b["image"], b["label"]) for b in C.image_tabular_batches()]

    def call(m, batch):
        tab, img, label = batch
        return m(img, tab), label

    rep = check_fixed(model, data, call=call)
    assert rep.before is not None and rep.before.samples == 96
    ref = varshift.probe(model, C.image_tabular_batches())
    got = varshift.probe(model, data, call=call)
    assert got.to_dict()["layers"] == ref.to_dict()["layers"]


# --------------------------------------------------------------------------- sizes, budget


def test_sizes_and_cuts_follow_the_batch_structure():
    imgs = [torch.randn(3, 5, 5) for _ in range(4)]  # per-sample images (detection style)
    batch = (imgs, [{"boxes": torch.zeros(1, 4)}] * 4)
    assert batch_size(batch) == 4
    small = cut(batch, 2)
    assert len(small[0]) == 2 and len(small[1]) == 2 and small[0][0] is imgs[0]
    d = {"a": torch.randn(6, 2), "b": torch.randn(6), "scale": torch.tensor(3.0)}
    c = cut(d, 4)
    assert c["a"].shape == (4, 2) and c["b"].shape == (4,) and c["scale"] is d["scale"]


@pytest.mark.parametrize("budget,sizes", [(25, [10, 10, 5]), (30, [10, 10, 10]), (1, [1])])
def test_max_samples_cuts_exactly_and_loads_nothing_past_it(budget, sizes):
    from torch.utils.data import DataLoader, Dataset

    class Counting(Dataset):
        def __init__(self):
            self.loaded = 0
            self.x = torch.randn(100, 6, generator=C.gen(1)) + 1

        def __len__(self):
            return 100

        def __getitem__(self, i):
            self.loaded += 1
            return self.x[i]

    ds = Counting()
    loader = DataLoader(ds, batch_size=10)
    model = C.dict_out()
    rep = varshift.probe(model, loader, max_samples=budget)
    assert rep.samples == budget and rep.batches == len(sizes)
    assert ds.loaded == 10 * len(sizes)  # not one batch more
    ref = varshift.probe(model, [ds.x[:budget]])
    assert rep.layers[0].eval_var_mean == pytest.approx(ref.layers[0].eval_var_mean, rel=1e-6)
    got = [len(b[0]) for b in varshift.data.as_batches(loader, max_samples=budget)]
    assert got == sizes


def test_max_samples_through_the_cli(tmp_path, cli, save):
    (tmp_path / "calib_budget.py").write_text(textwrap.dedent('''
        import torch
        PULLED = []
        def batches():
            g = torch.Generator().manual_seed(0)
            for i in range(10):
                PULLED.append(i)
                yield torch.randn(8, 6, generator=g) + 1
    '''))
    path = save(C.dict_out(), "m.pt")
    data = f"{tmp_path / 'calib_budget.py'}:batches"
    r = cli("probe", path, "--data", data, "--max-samples", 20, "--format", "json", "--trust",
            "--fail-above", "inf")
    assert r.code == 0, r.err
    import json

    assert json.loads(r.out)["summary"]["samples"] == 20
    r = cli("probe", path, "--data", data, "--max-samples", 0, "--trust")
    assert r.code == 2 and r.err_lines == ["varshift: error: --max-samples must be an integer >= 1, got 0"]


# --------------------------------------------------------------------------- bad input


CALLS = '''
import torch

def raises(model, batch):
    raise KeyError("pixel_values")

def none(model, batch):
    model(batch[0])

def text(model, batch):
    return "done"

def good(model, batch):
    return model(batch[0]), batch[1]
'''


@pytest.mark.parametrize("fn,fragment", [
    ("raises", "--call '{spec}' raised on batch 0 (KeyError: 'pixel_values')"),
    ("none", "--call '{spec}' returned None on batch 0"),
    ("text", "--call '{spec}' returned a str with no tensor in it on batch 0"),
    ("missing", "--call '{spec}': {file} has no attribute 'missing'"),
])
def test_bad_call_is_one_line_exit_2(tmp_path, cli, save, fn, fragment):
    (tmp_path / "calls.py").write_text(CALLS)
    model = C.dict_out()
    path = save(model, "m.pt")
    x = torch.randn(16, 6)
    torch.save((x, torch.zeros(16, dtype=torch.long)), tmp_path / "d.pt")
    spec = f"{tmp_path / 'calls.py'}:{fn}"
    for command in (["probe"], ["recalibrate", "-o", tmp_path / "out.pt"]):
        r = cli(*command, path, "--data", tmp_path / "d.pt", "--call", spec, "--trust")
        assert r.code == 2, (command, r.out, r.err)
        assert len(r.err_lines) == 1 and r.err_lines[0].startswith("varshift: error: ")
        assert fragment.format(spec=spec, file=tmp_path / "calls.py") in r.err, r.err
    assert not (tmp_path / "out.pt").exists()
    good = cli("recalibrate", path, "--data", tmp_path / "d.pt", "-o", tmp_path / "out.pt",
               "--call", f"{tmp_path / 'calls.py'}:good", "--trust", "--format", "json")
    assert good.code == 0, good.err


def test_dict_keys_that_fit_nothing_and_missing_output_key(tmp_path, cli, save):
    path = save(C.image_tabular(), "m.pt")
    torch.save({"picture": torch.randn(8, 3, 6, 6), "table": torch.randn(8, 5)}, tmp_path / "d.pt")
    r = cli("probe", path, "--data", tmp_path / "d.pt", "--trust")
    assert r.code == 2 and len(r.err_lines) == 1
    assert ("batch 0 is a dict with keys picture, table: none names a parameter of "
            "ImageTabular.forward(image, tabular) and none is one of inputs, input, x"
            in r.err), r.err
    batches = C.image_tabular_batches(2)
    torch.save({k: torch.cat([b[k] for b in batches]) for k in batches[0]}, tmp_path / "ok.pt")
    r = cli("recalibrate", path, "--data", tmp_path / "ok.pt", "-o", tmp_path / "o.pt",
            "--output-key", "scores", "--trust")
    assert r.code == 2 and len(r.err_lines) == 1 and "--output-key 'scores'" in r.err, r.err
    assert not (tmp_path / "o.pt").exists()
    r = cli("recalibrate", path, "--data", tmp_path / "ok.pt", "-o", tmp_path / "o.pt",
            "--trust", "--exact", "--format", "json", "--onnx", tmp_path / "o.onnx")
    assert r.code == 0, r.err
    import json

    doc = json.loads(r.out)
    assert doc["metrics"]["before"]["samples"] == 32


class NeedsLabelsInTraining(nn.Module):
    """Data-dependent control flow (fx cannot trace it) and a forward that needs its labels
    in training mode: only a real batch can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, labels=None):
        if self.training and labels is None:
            raise ValueError("labels are required in training")
        h = self.fc(x)
        if h.sum() > -1e9:  # data-dependent: fx cannot trace this
            h = self.drop(h)
        return self.head(self.bn(h))


def test_scan_traces_with_the_first_batch(tmp_path, cli, save):
    model = NeedsLabelsInTraining().eval()
    path = save(model, "m.pt")
    batch = {"x": torch.randn(8, 4), "labels": torch.arange(8) % 3}
    torch.save(batch, tmp_path / "d.pt")
    rep = varshift.scan(model, batch)
    assert affected(rep) == {"bn"} and rep.traced_with == "dynamic"
    r = cli("scan", path, "--data", tmp_path / "d.pt", "--trust", "--format", "json")
    assert r.code == 1, r.err  # an error finding
    import json

    assert [n["name"] for n in json.loads(r.out)["norms"] if n["affected"]] == ["bn"]


class EEGNet(nn.Module):
    """(N, 22 electrodes, 256 samples); data-dependent control flow fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(22, 8, 5)
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        if x.abs().max() > 1e6:
            x = x / 1e6
        return self.bn(self.drop(self.conv(x)))


def test_the_input_shape_hint_comes_from_the_first_layer(tmp_path, cli, save):
    from varshift.errors import TraceError

    with pytest.raises(TraceError, match=r"`input_shape=1,22,256`\) or `data`"):
        varshift.scan(EEGNet())
    from varshift.inputs import shape_hint

    assert shape_hint(NeedsLabelsInTraining()) == "1,4"
    assert shape_hint(C.Tokens()) is None and shape_hint(C.ImageTabular()) is None  # use --data
    path = save(EEGNet(), "eeg.pt")
    r = cli("scan", path, "--trust", "--input-shape", "1,22,256", "--format", "json")
    assert r.code == 1, r.err
