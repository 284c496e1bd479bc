"""Calibration data: every DATA format, --batch-size / --max-batches, and every bad input
(a DataError with a one-line message; through the CLI, exit 2 and one line on stderr)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from varshift.data import Calibration, as_batches, load_data
from varshift.errors import DataError
from varshift.probing import probe

from fixtures import probe_models as P

N = 50  # samples in every file here


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    x = P.images(N, seed=0)
    y = torch.arange(N) % 4
    return x, y


def collect(cal) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    xs, ys, sizes = [], [], []
    for x, y in cal:
        xs.append(x)
        sizes.append(len(x))
        if y is not None:
            ys.append(y)
    return torch.cat(xs), (torch.cat(ys) if ys else None), sizes


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def load_all(spec, **kw):
    """load_data and iterate (errors inside batches surface while iterating)."""
    return collect(load_data(spec, **kw))


# --------------------------------------------------------------------------- formats


def test_pt_tensor(tmp_path, xy):
    x, _ = xy
    torch.save(x, tmp_path / "x.pt")
    got, labels, sizes = load_all(tmp_path / "x.pt", batch_size=7)
    assert torch.equal(got, x) and labels is None
    assert sizes == [7] * 6 + [8]  # a trailing single sample joins the previous batch


@pytest.mark.parametrize("container", [tuple, list])
def test_pt_inputs_labels_pair(tmp_path, xy, container):
    x, y = xy
    torch.save(container([x, y]), tmp_path / "xy.pt")
    got, labels, sizes = load_all(tmp_path / "xy.pt", batch_size=20)
    assert torch.equal(got, x) and torch.equal(labels, y)
    assert sizes == [20, 20, 10]


@pytest.mark.parametrize("keys", [("inputs", "labels"), ("x", "y"), ("inputs", None)])
def test_pt_dict(tmp_path, xy, keys):
    x, y = xy
    obj = {keys[0]: x} if keys[1] is None else {keys[0]: x, keys[1]: y}
    torch.save(obj, tmp_path / "d.pt")
    got, labels, _ = load_all(tmp_path / "d.pt")
    assert torch.equal(got, x)
    assert (labels is None) if keys[1] is None else torch.equal(labels, y)


def test_pt_tensor_dataset(tmp_path, xy):
    torch.save(TensorDataset(*xy), tmp_path / "ds.pt")
    got, labels, _ = load_all(tmp_path / "ds.pt", batch_size=7)
    assert torch.equal(got, xy[0]) and torch.equal(labels, xy[1])


def test_npy(tmp_path, xy):
    np.save(tmp_path / "x.npy", xy[0].numpy())
    got, labels, sizes = load_all(tmp_path / "x.npy", batch_size=25)
    assert torch.equal(got, xy[0]) and labels is None and sizes == [25, 25]


@pytest.mark.parametrize("names", [("inputs", "labels"), ("x", "y"), ("arr_0", None)])
def test_npz(tmp_path, xy, names):
    x, y = (t.numpy() for t in xy)
    if names[1] is None:
        np.savez(tmp_path / "d.npz", x)  # a single unnamed array: arr_0
    else:
        np.savez(tmp_path / "d.npz", **{names[0]: x, names[1]: y})
    got, labels, _ = load_all(tmp_path / "d.npz")
    assert torch.equal(got, xy[0])
    assert (labels is None) if names[1] is None else torch.equal(labels, xy[1])


CALLABLES = '''
import torch
from torch.utils.data import DataLoader, TensorDataset

CALLS = []

def _x():
    return torch.randn(50, 3, 8, 8, generator=torch.Generator().manual_seed(0))

def generator():
    CALLS.append("generator")
    x = _x()
    for i in range(0, 50, 10):
        yield x[i:i + 10]

def pairs():
    x = _x()
    return [(x[i:i + 10], torch.zeros(10, dtype=torch.long)) for i in range(0, 50, 10)]

def dicts():
    x = _x()
    return [{"inputs": x[i:i + 10], "labels": torch.zeros(10)} for i in range(0, 50, 10)]

def loader():
    return DataLoader(TensorDataset(_x(), torch.zeros(50)), batch_size=10)

def not_iterable():
    return 42

def one_tensor():
    return _x()

def raises():
    raise ValueError("no dataset here")

def breaks_midway():
    x = _x()
    yield x[:10]
    raise OSError("disk went away")

def bad_labels():
    return [(_x()[:10], torch.zeros(9))]

NOT_CALLABLE = 3
'''


@pytest.fixture
def calib_module(tmp_path, monkeypatch):
    """A module ``calib_mod_<n>`` on sys.path (unique per test: no stale imports)."""
    name = f"calib_mod_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(CALLABLES))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize("fn", ["generator", "pairs", "dicts", "loader"])
def test_module_callable(calib_module, fn):
    want = torch.randn(50, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    got, labels, sizes = load_all(f"{calib_module}:{fn}", batch_size=3)  # callables batch themselves
    assert torch.equal(got, want) and sizes == [10] * 5
    assert (labels is None) == (fn == "generator")


def test_file_callable(tmp_path):
    (tmp_path / "make_calib.py").write_text(textwrap.dedent(CALLABLES))
    got, labels, sizes = load_all(f"{tmp_path / 'make_calib.py'}:pairs")
    assert got.shape == (50, 3, 8, 8) and labels.shape == (50,) and sizes == [10] * 5


def test_callable_is_called_once_per_probe(calib_module):
    import importlib

    mod = importlib.import_module(calib_module)
    rep = probe(P.trained_net(), load_data(f"{calib_module}:generator"))
    assert rep.samples == 50 and mod.CALLS == ["generator"]


@pytest.mark.parametrize("batch_size,max_batches,sizes", [
    (10, None, [10] * 5), (10, 3, [10] * 3), (7, 2, [7, 7]), (49, None, [50]),
    (100, None, [50]), (1, 4, [1, 1, 1, 1]),
])
def test_batch_size_and_max_batches(tmp_path, xy, batch_size, max_batches, sizes):
    torch.save(xy, tmp_path / "xy.pt")
    cal = load_data(tmp_path / "xy.pt", batch_size=batch_size, max_batches=max_batches)
    got, labels, got_sizes = collect(cal)
    assert got_sizes == sizes
    assert torch.equal(got, xy[0][:sum(sizes)]) and torch.equal(labels, xy[1][:sum(sizes)])
    assert cal.samples == sum(sizes) and cal.n_batches == len(sizes)


def test_max_batches_for_a_callable_pulls_no_extra_batch(calib_module):
    import importlib

    mod = importlib.import_module(calib_module)
    pulled = []

    def counting():
        for x in mod.generator():
            pulled.append(len(x))
            yield x

    mod.counting = counting
    cal = load_data(f"{calib_module}:counting", max_batches=2)
    _, _, sizes = collect(cal)
    assert sizes == [10, 10] and cal.samples == 20
    assert pulled == [10, 10]  # a DataLoader would otherwise load a batch for nothing


def test_probe_counts_samples_with_batch_options(tmp_path, xy):
    torch.save(xy, tmp_path / "xy.pt")
    rep = probe(P.trained_net(), load_data(tmp_path / "xy.pt", batch_size=8, max_batches=3))
    assert rep.samples == 24 and rep.batches == 3


def test_integer_images_are_cast_to_float(tmp_path):
    """uint8 images run in the model's float dtype, with the same numbers as float input."""
    pixels = torch.randint(0, 256, (40, 3, 8, 8), generator=P.gen(3), dtype=torch.uint8)
    torch.save(pixels, tmp_path / "u8.pt")
    model = P.trained_net()
    rep = probe(model, load_data(tmp_path / "u8.pt", batch_size=20), seed=2)
    ref = probe(model, [pixels[:20].float(), pixels[20:].float()], seed=2)
    assert rep.to_dict()["layers"] == ref.to_dict()["layers"]
    want = P.reference_stats(model, [pixels[:20].float(), pixels[20:].float()], 2)
    for layer in rep.layers:
        assert layer.eval_var_mean == pytest.approx(
            P.expected_layer(want, layer.name)["eval_var_mean"], rel=1e-4)


def test_as_batches_wraps_api_arguments():
    x = P.images(6)
    assert len(list(as_batches([x, (x, None)]))) == 2
    assert len(list(as_batches(x))) == 1  # a bare tensor is one batch
    g = as_batches(iter([x, x]))
    assert len(list(g)) == 2 and len(list(g)) == 2  # materialized: re-iterable
    assert isinstance(as_batches(DataLoader(TensorDataset(x), batch_size=2)), Calibration)


# --------------------------------------------------------------------------- bad input


def _write(tmp_path: Path, name: str, make) -> str:
    path = tmp_path / name
    make(path)
    return str(path)


BAD = {
    # name: (build DATA spec in tmp_path, a fragment the message must contain)
    "missing file": (lambda t, m: str(t / "nope.pt"), "no such file"),
    "empty file": (lambda t, m: _write(t, "empty.pt", lambda p: p.write_bytes(b"")), "empty"),
    "corrupt pt": (lambda t, m: _write(t, "bad.pt", lambda p: p.write_bytes(b"PK\x03\x04junk" * 9)),
                   "not a torch.save file"),
    "object npy": (lambda t, m: _write(t, "obj.npy", lambda p: np.save(
        p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)), "numpy"),
    "object npz": (lambda t, m: _write(t, "obj.npz", lambda p: np.savez(
        p, inputs=np.array([{"a": 1}, None], dtype=object))), "numpy"),
    "pickle in npy": (lambda t, m: _write(t, "pkl.npy", lambda p: p.write_bytes(
        __import__("pickle").dumps([1, 2, 3]))), "numpy"),
    "string in pt": (lambda t, m: _write(t, "s.pt", lambda p: torch.save("hello", p)), "holds a str"),
    "unsupported extension": (lambda t, m: _write(t, "x.csv", lambda p: p.write_text("1,2\n")),
                              "unsupported file type .csv"),
    "nan inputs": (lambda t, m: _write(t, "nan.pt", lambda p: torch.save(
        torch.cat([P.images(10), torch.full((1, 3, 8, 8), float("nan"))]), p)), "NaN/Inf"),
    "inf inputs": (lambda t, m: _write(t, "inf.npy", lambda p: np.save(
        p, np.full((4, 3, 8, 8), np.inf, dtype=np.float32))), "NaN/Inf"),
    "label count": (lambda t, m: _write(t, "xy.pt", lambda p: torch.save(
        (P.images(10), torch.zeros(9)), p)), "10 inputs but 9 labels"),
    "label count in a batch": (lambda t, m: f"{m}:bad_labels", "10 inputs but 9 labels"),
    "no such callable": (lambda t, m: f"{m}:nothing_here", "no attribute 'nothing_here'"),
    "no such module": (lambda t, m: "no_such_module_xyz:fn", "cannot import"),
    "not callable": (lambda t, m: f"{m}:NOT_CALLABLE", "not callable"),
    "returns a non-iterable": (lambda t, m: f"{m}:not_iterable", "iterable"),
    "returns one tensor": (lambda t, m: f"{m}:one_tensor", "returned a single Tensor of shape (50, 3, 8, 8)"),
    "callable raises": (lambda t, m: f"{m}:raises", "no dataset here"),
    "iteration raises": (lambda t, m: f"{m}:breaks_midway", "disk went away"),
    "dict without inputs": (lambda t, m: _write(t, "d.pt", lambda p: torch.save(
        {"images_wrong": P.images(4)}, p)), "none names a parameter of Sequential.forward(input)"),
    "empty tensor": (lambda t, m: _write(t, "e.pt", lambda p: torch.save(torch.zeros(0, 3, 8, 8), p)),
                     "no samples"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_a_one_line_data_error(tmp_path, calib_module, case):
    make, fragment = BAD[case]
    spec = make(tmp_path, calib_module)
    with pytest.raises(DataError) as info:
        probe(P.trained_net(), load_data(spec))
    assert fragment in one_line(info)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_through_the_cli(tmp_path, calib_module, cli, case):
    model = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(P.trained_net(), model)
    make, fragment = BAD[case]
    res = cli("probe", model, "--data", make(tmp_path, calib_module), "--device", "cpu")
    assert res.code == 2, res.err
    assert len(res.err_lines) == 1 and "Traceback" not in res.err, res.err
    assert res.err.startswith("varshift: error: ") and fragment in res.err
    assert res.out == ""


@pytest.mark.parametrize("shape,got", [
    ((10, 5, 8, 8), "(10, 5, 8, 8)"),    # wrong channels
    ((10, 192), "(10, 192)"),            # flattened: wrong rank
    ((10, 8, 8), "(10, 8, 8)"),          # missing channel axis
])
def test_data_that_does_not_fit_the_model(tmp_path, cli, shape, got):
    torch.save(torch.randn(shape, generator=P.gen(0)), tmp_path / "x.pt")
    with pytest.raises(DataError) as info:
        probe(P.trained_net(), load_data(tmp_path / "x.pt"))
    msg = one_line(info)
    assert got in msg and "expects (N, 3, H, W)" in msg  # what it got, what the model expects
    model = tmp_path / "m.pt"
    torch.save(P.trained_net(), model)
    res = cli("probe", model, "--data", tmp_path / "x.pt")
    assert res.code == 2 and len(res.err_lines) == 1 and got in res.err
    assert "expects (N, 3, H, W)" in res.err


@pytest.mark.parametrize("option,value,fragment", [
    ("--batch-size", 0, "--batch-size must be >= 1, got 0"),
    ("--batch-size", -3, "--batch-size must be >= 1"),
    ("--max-batches", 0, "--max-batches must be >= 1"),
])
def test_bad_batch_options(tmp_path, xy, cli, option, value, fragment):
    torch.save(xy, tmp_path / "xy.pt")
    param = option.lstrip("-").replace("-", "_")
    with pytest.raises(DataError) as info:
        load_data(tmp_path / "xy.pt", **{param: value})
    assert fragment.replace(option, f"`{param}`") in one_line(info)  # the library names its parameter
    model = tmp_path / "m.pt"
    torch.save(P.trained_net(), model)
    res = cli("probe", model, "--data", tmp_path / "xy.pt", option, value)
    assert res.code == 2 and len(res.err_lines) == 1 and fragment in res.err
