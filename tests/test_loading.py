"""Safe loading: whole modules, refused and malicious pickles, state dicts with --arch."""

from __future__ import annotations

import pickle
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from varshift.cli.terms import flags
from varshift.errors import ArchError, LoadError, RefusedPickleError, StateDictMismatch
from varshift.loading import load_model, parse_arch_args, resolve_arch

from conftest import TESTS
from fixtures import models as M

FIXTURE_ARCH = f"{TESTS / 'fixtures' / 'models.py'}:build"


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def trained(model: nn.Module) -> nn.Module:
    """Give the BatchNorms non-default running statistics, so loading them is observable."""
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 8, 8) * 3 + 1)
    return model.eval()


# --------------------------------------------------------------------------- whole modules


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_nn_state_dict_formats_load(save, zip_format: bool) -> None:
    original = trained(M.plain_dropout_bn())
    path = save(original.state_dict(), _use_new_zipfile_serialization=zip_format)
    loaded = load_model(path, arch=FIXTURE_ARCH)
    assert loaded.form == "checkpoint"
    assert same_weights(loaded.module, original)


def test_whole_module_loads_without_flags(save) -> None:
    original = trained(M.plain_dropout_bn())
    path = save(original)
    loaded = load_model(path)
    assert loaded.form == "module" and loaded.trusted is False
    assert isinstance(loaded.module, nn.Sequential)
    assert same_weights(loaded.module, original)
    assert loaded.module.training is False  # the mode it was saved in
    assert isinstance(loaded.module[1], nn.Dropout) and loaded.module[1].p == 0.2


def test_whole_module_keeps_train_mode(save) -> None:
    path = save(M.plain_dropout_bn().train())
    assert load_model(path).module.training is True


def test_whole_module_with_arch_is_noted(save) -> None:
    path = save(M.plain_dropout_bn())
    loaded = load_model(path, arch=FIXTURE_ARCH)
    assert loaded.form == "module"
    assert any(f"`arch={FIXTURE_ARCH!r}` was not needed" in note for note in loaded.notes)


def test_safe_globals_do_not_leak(save) -> None:
    before = list(torch.serialization.get_safe_globals())
    load_model(save(M.plain_dropout_bn()))
    assert list(torch.serialization.get_safe_globals()) == before


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_custom_class_is_refused_and_named(save, zip_format: bool) -> None:
    path = save(M.ModuleDropoutBN(), _use_new_zipfile_serialization=zip_format)
    with pytest.raises(RefusedPickleError) as info:
        load_model(path)
    message = str(info.value)
    assert "fixtures.models.ModuleDropoutBN" in message
    assert "`trust=True`" in message and "`arch='pkg.module:fn'`" in message
    # the library names its parameters; the command line reads them as its flags
    assert "pass --arch pkg.module:fn with a state dict, or --trust if you trust" in flags(message)
    assert "\n" not in message
    assert info.value.classes == ["fixtures.models.ModuleDropoutBN"]


def test_refusal_names_every_foreign_class_but_no_torch_nn_one(save) -> None:
    model = nn.Sequential(M.DropPath(0.1), M.MyBN(3), nn.ReLU())
    with pytest.raises(RefusedPickleError) as info:
        load_model(save(model))
    assert info.value.classes == ["fixtures.models.DropPath", "fixtures.models.MyBN"]
    assert "ReLU" not in str(info.value)


def test_trust_loads_custom_class(save) -> None:
    original = trained(M.ModuleDropoutBN().train()).eval()
    loaded = load_model(save(original), trust=True)
    assert type(loaded.module) is M.ModuleDropoutBN
    assert loaded.trusted is True
    assert same_weights(loaded.module, original)


def test_legacy_whole_module_is_refused_without_trust(save) -> None:
    """Legacy (pre-zip) whole-module saves store source code: only --trust reads them."""
    path = save(M.plain_dropout_bn(), _use_new_zipfile_serialization=False)
    with pytest.raises(RefusedPickleError, match="`trust=True`"):
        load_model(path)
    assert isinstance(load_model(path, trust=True).module, nn.Sequential)


# --------------------------------------------------------------------------- malicious pickles


class Payload:
    """Unpickling this opens (creates) ``marker`` for writing: code runs at load time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    files = {}
    payload = Payload(marker)

    files["zip"] = tmp_path / "evil_zip.pt"
    torch.save(payload, files["zip"])
    files["legacy"] = tmp_path / "evil_legacy.pt"
    torch.save(payload, files["legacy"], _use_new_zipfile_serialization=False)
    for protocol in (2, 4):
        files[f"pickle{protocol}"] = tmp_path / f"evil_plain{protocol}.pkl"
        files[f"pickle{protocol}"].write_bytes(pickle.dumps(payload, protocol=protocol))
    files["in_checkpoint"] = tmp_path / "evil_ckpt.pt"
    torch.save({"state_dict": M.plain_dropout_bn().state_dict(), "extra": payload},
               files["in_checkpoint"])
    model = M.plain_dropout_bn()
    model.hook = payload  # hidden in a torch.nn-only module's __dict__
    files["in_module"] = tmp_path / "evil_module.pt"
    torch.save(model, files["in_module"])
    return files


def test_payload_is_live(tmp_path: Path) -> None:
    """The payload really runs code under an ordinary unpickler (so the tests below can fail)."""
    marker = tmp_path / "PWNED"
    for path in _malicious_files(tmp_path, marker).values():
        if path.suffix == ".pkl":
            marker.unlink(missing_ok=True)
            pickle.loads(path.read_bytes()).close()
            assert marker.exists()
    marker.unlink()
    torch.load(tmp_path / "evil_zip.pt", weights_only=False).close()
    assert marker.exists()


@pytest.mark.parametrize(
    "kind", ["zip", "legacy", "pickle2", "pickle4", "in_checkpoint", "in_module"]
)
def test_malicious_pickle_never_runs(tmp_path: Path, kind: str, cli) -> None:
    marker = tmp_path / "PWNED"
    path = _malicious_files(tmp_path, marker)[kind]

    with pytest.raises(LoadError) as info:
        load_model(path, arch=FIXTURE_ARCH)
    assert not marker.exists()
    assert "\n" not in str(info.value)
    if kind in ("zip", "legacy", "in_checkpoint", "in_module"):
        assert isinstance(info.value, RefusedPickleError)
        assert "io.open" in str(info.value) and "`trust=True`" in str(info.value)

    result = cli("scan", path, "--arch", FIXTURE_ARCH)
    assert result.code == 2
    assert not marker.exists()
    assert len(result.err_lines) == 1 and result.out == ""


# --------------------------------------------------------------------------- state dict + arch


def test_arch_from_package_on_sys_path(tmp_path: Path, save, monkeypatch) -> None:
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def small(p=0.2, width=8):
            return nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.Dropout(p),
                nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
            )
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    original = trained(M.plain_dropout_bn(p=0.3, width=4))
    path = save(original.state_dict())

    loaded = load_model(path, arch="userpkg.nets:small", arch_args={"p": 0.3, "width": 4})
    assert loaded.form == "checkpoint"
    assert same_weights(loaded.module, original)
    assert loaded.module[1].p == 0.3


def test_arch_from_file_path(tmp_path: Path, save) -> None:
    folder = tmp_path / "code"
    folder.mkdir()
    # The file imports a sibling module: its folder is importable while it loads.
    (folder / "layers.py").write_text("WIDTH = 6\n")
    (folder / "net.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        from layers import WIDTH

        def make():
            return nn.Sequential(nn.Conv2d(3, WIDTH, 1), nn.Dropout(0.1), nn.BatchNorm2d(WIDTH))
    """))
    original = trained(nn.Sequential(nn.Conv2d(3, 6, 1), nn.Dropout(0.1), nn.BatchNorm2d(6)))
    loaded = load_model(save(original.state_dict()), arch=f"{folder / 'net.py'}:make")
    assert same_weights(loaded.module, original)


@pytest.mark.parametrize(
    "layout,path",
    [
        (lambda sd: sd, ()),
        (lambda sd: {"state_dict": sd, "epoch": 3}, ("state_dict",)),
        (lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}, ("model",)),
        (lambda sd: {"model_state_dict": sd, "epoch": 9, "loss": 0.5}, ("model_state_dict",)),
        (lambda sd: {"net": sd}, ("net",)),
        (lambda sd: {"model": {"state_dict": sd}, "step": 100}, ("model", "state_dict")),
        (lambda sd: {"state": {"model": sd}}, ("state", "model")),
    ],
    ids=["bare", "state_dict", "model", "model_state_dict", "net", "nested", "nested2"],
)
def test_checkpoint_layouts(save, layout, path) -> None:
    original = trained(M.plain_dropout_bn())
    loaded = load_model(save(layout(original.state_dict())), arch=FIXTURE_ARCH)
    assert loaded.form == "checkpoint"
    assert loaded.state_path == path
    assert same_weights(loaded.module, original)


def test_whole_module_inside_a_checkpoint(save) -> None:
    original = trained(M.plain_dropout_bn())
    loaded = load_model(save({"model": original, "epoch": 1}))
    assert loaded.form == "checkpoint-module" and loaded.state_path == ("model",)
    assert same_weights(loaded.module, original)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(save, prefix: str) -> None:
    original = trained(M.plain_dropout_bn())
    sd = {prefix + k: v for k, v in original.state_dict().items()}
    loaded = load_model(save({"state_dict": sd}), arch=FIXTURE_ARCH)
    assert same_weights(loaded.module, original)
    assert loaded.key_map["3.running_var"] == prefix + "3.running_var"


def test_missing_and_unexpected_keys_are_listed_with_counts(save) -> None:
    sd = M.plain_dropout_bn().state_dict()
    del sd["0.weight"], sd["0.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatch) as info:
        load_model(save(sd), arch=FIXTURE_ARCH)
    message = str(info.value)
    assert "2 missing key(s): 0.weight, 0.bias" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "\n" not in message


def test_many_missing_keys_are_abbreviated(save) -> None:
    sd = M.plain_dropout_bn().state_dict()
    with pytest.raises(StateDictMismatch, match=r"16 unexpected key\(s\): .*\(\+12\)"):
        load_model(save({f"x.{k}": v for k, v in sd.items()}), arch=FIXTURE_ARCH)


def test_shape_mismatch_message(save) -> None:
    sd = M.plain_dropout_bn(width=8).state_dict()
    with pytest.raises(StateDictMismatch) as info:
        load_model(save(sd), arch=FIXTURE_ARCH, arch_args={"width": 4})
    message = str(info.value)
    assert "shape mismatch(es) (file vs model)" in message
    assert "0.weight (8, 3, 3, 3) vs (4, 3, 3, 3)" in message
    assert "missing" not in message and "unexpected" not in message


def test_state_dict_without_arch_asks_for_it(save) -> None:
    with pytest.raises(LoadError, match=r"state dict \(16 tensors\).*`arch='pkg.module:fn'`") as info:
        load_model(save(M.plain_dropout_bn().state_dict()))
    assert flags(str(info.value)).endswith(
        "pass --arch pkg.module:fn or --arch path/to/file.py:fn (and --arch-args '{...}' for its "
        "arguments)")


def test_num_batches_tracked_may_be_missing(save) -> None:
    """Old checkpoints predate num_batches_tracked; they still load."""
    original = trained(M.plain_dropout_bn())
    sd = {k: v for k, v in original.state_dict().items() if "num_batches" not in k}
    loaded = load_model(save(sd), arch=FIXTURE_ARCH)
    assert torch.equal(loaded.module[3].running_var, original[3].running_var)


# --------------------------------------------------------------------------- arch errors


def test_parse_arch_args() -> None:
    assert parse_arch_args(None) == {} and parse_arch_args("") == {}
    assert parse_arch_args('{"p": 0.1, "name": "x"}') == {"p": 0.1, "name": "x"}
    with pytest.raises(ArchError, match="^`arch_args` is not valid JSON"):
        parse_arch_args("{p: 1}")
    for text in ("[1, 2]", "3", '"x"', "null"):
        with pytest.raises(ArchError, match="^`arch_args` must be a JSON object") as info:
            parse_arch_args(text)
        assert flags(str(info.value)).startswith("--arch-args must be a JSON object such as ")


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("no_colon_here", "must be pkg.module:callable"),
        ("pkg.mod:", "must be pkg.module:callable"),
        ("varshift_no_such_pkg.nets:build", "cannot import 'varshift_no_such_pkg.nets'"),
        (f"{TESTS / 'fixtures' / 'models.py'}:NOT_CALLABLE", "NOT_CALLABLE is a int, not callable"),
        (f"{TESTS / 'fixtures' / 'models.py'}:nope", "no attribute 'nope'; callables there: AlphaDropoutBN, "),
        ("/nonexistent/dir/net.py:build", "no such file"),
    ],
)
def test_resolve_arch_errors(spec: str, pattern: str) -> None:
    with pytest.raises(ArchError, match=pattern) as info:
        resolve_arch(spec)
    assert str(info.value).startswith(f"`arch` {spec!r}")  # the parameter; the CLI: --arch


def test_arch_file_that_fails_to_import(tmp_path: Path, save) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("def build(:\n")
    with pytest.raises(ArchError, match="importing .*broken.py failed \\(SyntaxError"):
        load_model(save(M.plain_dropout_bn().state_dict()), arch=f"{bad}:build")


def test_arch_that_raises_or_returns_no_module(tmp_path: Path, save) -> None:
    code = tmp_path / "arches.py"
    code.write_text("def boom(**kw):\n    raise ValueError('no such depth')\n"
                    "def number():\n    return 3\n")
    sd = save(M.plain_dropout_bn().state_dict())
    with pytest.raises(ArchError, match=r"calling it with \{\"depth\": 5\} failed \(ValueError: no such depth\)"):
        load_model(sd, arch=f"{code}:boom", arch_args={"depth": 5})
    with pytest.raises(ArchError, match="returned a int, not a torch.nn.Module"):
        load_model(sd, arch=f"{code}:number")
    with pytest.raises(ArchError, match="unexpected keyword argument 'depth'"):
        load_model(sd, arch=FIXTURE_ARCH, arch_args={"depth": 5})


# --------------------------------------------------------------------------- not models


def _torchscript(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)


def _onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    onnx.save(helper.make_model(graph), path)


def _truncated(path: Path, zip_format: bool = True) -> None:
    torch.save(M.plain_dropout_bn().state_dict(), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
        (lambda p: p.mkdir(), "is a directory"),
        (_truncated, "truncated or corrupt"),
        (lambda p: _truncated(p, zip_format=False), "truncated or corrupt"),
        (lambda p: p.write_bytes(bytes(range(256)) * 8), "not a PyTorch file"),
        (lambda p: p.write_bytes(b"\x80" + bytes(range(255, 0, -1)) * 4), "not a torch.save file"),
        (lambda p: torch.save([1, 2, 3], p), "holds a list, not a model"),
        (lambda p: torch.save({"a": 1, "b": 2}, p), "holds a dict, not a model"),
        (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not a model"),
        (_torchscript, "TorchScript archive"),
        (_onnx, "ONNX model"),
    ],
    ids=["missing", "empty", "directory", "truncated-zip", "truncated-legacy", "garbage",
         "garbage-pickle-like", "list", "dict-of-ints", "tensor", "torchscript", "onnx"],
)
def test_files_that_are_not_models(tmp_path: Path, make, pattern: str) -> None:
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(LoadError, match=pattern) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_onnx_by_extension(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    _onnx(path)
    with pytest.raises(LoadError, match="ONNX model"):
        load_model(path)
