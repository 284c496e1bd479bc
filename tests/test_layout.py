"""The package's layout rules (docs/architecture.md), read from the source.

Each rule is checked on the whole package: a new module or a new import that breaks one fails
here, with the offending file and line.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
architecture = importlib.util.module_from_spec(_spec)
sys.modules["architecture"] = architecture  # dataclasses look their module up
_spec.loader.exec_module(architecture)

MODULES = architecture.modules()
GRAPH = architecture.imports(MODULES)
STAGES = ("graph", "rules", "measure", "fix", "report", "io", "cli")
#: Top-level modules that are not leaves: they put the stages together.
GLUE = {"varshift", "varshift.__main__", "varshift.files", "varshift.export", "varshift.testing",
        "varshift.lightning"}
LEAVES = {m for m in MODULES if m.count(".") == 1 and m not in GLUE
          and m.split(".")[1] not in STAGES}

#: Functions whose parameters are documented public interface (the Python API's keyword
#: arguments, the commands' options); each builds option objects and calls an internal
#: function of at most 8 parameters.
PUBLIC_WIDE = {
    "varshift.files.scan_file", "varshift.files.probe_file", "varshift.files.recalibrate_file",
    "varshift.files.swap_file", "varshift.files.export_file",
    "varshift.fix.recalibration.recalibrate", "varshift.measure.probing.probe",
    "varshift.cli.app.probe", "varshift.cli.app.recalibrate", "varshift.cli.app.swap",
    "varshift.cli.app.export",
}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def _violations(source_filter, target_filter) -> list[str]:
    return [f"{MODULES[m].relative_to(ROOT)}:{i.line} imports {i.target}"
            for m, imps in GRAPH.items() if source_filter(m)
            for i in imps if target_filter(i.target)]


def test_the_analysis_sees_the_package():
    """The rules below are vacuous if the parser found nothing: it finds the known edges."""
    assert {"varshift.files", "varshift.fix.recalibration", "varshift.graph"} <= set(MODULES)
    targets = {i.target for i in GRAPH["varshift.fix.recalibration"]}
    assert "varshift.measure.context" in targets and "varshift.report.results" in targets
    # a deliberately cyclic pair is found as a cycle
    fake = {"a": [architecture.Import("b", 1, False, False)],
            "b": [architecture.Import("a", 1, True, False)], "c": []}
    assert architecture.cycles(fake) == [["a", "b"]]


def test_no_import_cycles():
    """Counting every import: module level, function-local and TYPE_CHECKING ones."""
    assert architecture.cycles(GRAPH) == []


def test_graph_imports_no_later_stage():
    bad = _violations(lambda m: _stage(m) == "graph",
                      lambda t: _stage(t) in ("rules", "measure", "fix", "report", "cli"))
    assert bad == []


def test_io_imports_no_later_stage():
    bad = _violations(lambda m: _stage(m) == "io",
                      lambda t: _stage(t) in ("graph", "rules", "measure", "fix", "report", "cli"))
    assert bad == []


def test_report_imports_no_stage_and_no_torch():
    bad = _violations(lambda m: _stage(m) == "report",
                      lambda t: _stage(t) not in (None, "report") or t in GLUE)
    assert bad == []
    for m, path in MODULES.items():
        if _stage(m) == "report":
            assert not architecture.external_imports(path) & {"torch", "onnx", "onnxruntime"}, path


def test_leaves_import_only_leaves():
    assert LEAVES >= {"varshift.errors", "varshift.options", "varshift.calling",
                      "varshift.batches", "varshift.uout"}
    bad = _violations(lambda m: m in LEAVES, lambda t: t not in LEAVES)
    assert bad == []


def test_no_function_takes_more_than_eight_parameters():
    wide = {f"{f.module}.{f.name}": f.params for f in architecture.functions(MODULES)
            if f.params > 8}
    assert set(wide) <= PUBLIC_WIDE, {k: v for k, v in wide.items() if k not in PUBLIC_WIDE}


def _public_kwargs_build_objects(fn) -> bool:
    """The body of a wide public function is a call of an internal function that takes option
    objects (no positional forwarding of its parameter list)."""
    tree = ast.parse(inspect.getsource(fn).lstrip())
    body = tree.body[0]
    names = {a.arg for a in body.args.args + body.args.kwonlyargs}
    for call in ast.walk(body):
        if isinstance(call, ast.Call):
            bare = [a for a in call.args if isinstance(a, ast.Name) and a.id in names]
            if len(bare) > 2:
                return False
    return True


@pytest.mark.parametrize("name", sorted(PUBLIC_WIDE - {n for n in PUBLIC_WIDE if ".cli." in n}))
def test_wide_public_functions_do_not_forward_positionally(name):
    module, _, attr = name.rpartition(".")
    fn = inspect.unwrap(getattr(importlib.import_module(module), attr))
    assert _public_kwargs_build_objects(fn), f"{name} forwards its parameters positionally"


def _flags() -> set[str]:
    from varshift.cli.terms import FLAGS

    return set(FLAGS.values()) | {"--help", "--version"}


def _message_strings(path: Path):
    """String constants that are not docstrings, with their lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
                    getattr(node.body[0], "value", None), ast.Constant):
                docstrings.add(id(node.body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            yield node.lineno, node.value


def test_only_the_cli_words_messages_in_flags():
    flags = _flags()
    pattern = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
    found = []
    for m, path in MODULES.items():
        if _stage(m) == "cli":
            continue
        for line, text in _message_strings(path):
            for flag in pattern.findall(text):
                if flag in flags:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {flag}")
    assert found == []


def test_the_flag_rule_catches_a_flag():
    """The check above is not vacuous: a flag in a message is found, one in a docstring is not."""
    sample = ROOT / "tests" / "data" / "_layout_sample.py"
    try:
        sample.write_text('"""Run with --labels."""\nX = "use --labels last"\n')
        strings = [t for _, t in _message_strings(sample)]
    finally:
        sample.unlink()
    assert strings == ["use --labels last"]


def test_every_cli_option_is_in_the_terms_table():
    import typer

    from varshift.cli.app import app
    from varshift.cli.terms import FLAGS

    command = typer.main.get_command(app)
    for name, cmd in command.commands.items():
        for p in cmd.params:
            long = [o for o in p.opts if o.startswith("--")]
            if p.param_type_name == "option" and long and long[0] not in ("--help",):
                assert FLAGS.get(p.name) == long[0], (name, p.name, long)


def test_terms_rewrite_parameters_into_flags():
    from varshift.cli.terms import flags

    assert flags("`labels` must be one of auto, none, last") == \
        "--labels must be one of auto, none, last"
    assert flags("use `batch_size=2` or more") == "use --batch-size 2 or more"
    assert flags("pass `all_norms=True`") == "pass --all-norms"
    assert flags("`device='cpu'`") == "--device cpu"
    assert flags("layer `features.3` and `fn(model, batch)`") == \
        "layer `features.3` and `fn(model, batch)`"


def test_every_exception_class_is_in_errors():
    import pkgutil

    import varshift
    import varshift.errors

    names = [m.name for m in pkgutil.walk_packages(varshift.__path__, "varshift.")]
    outside = []
    for name in names:
        if name in ("varshift.__main__",):
            continue
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:  # an optional integration whose package is not installed
            assert name == "varshift.lightning", exc
            continue
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) \
                    and obj.__module__.startswith("varshift") and obj.__module__ != "varshift.errors":
                outside.append(f"{obj.__module__}.{obj.__qualname__}")
    assert outside == []
    assert len([o for o in vars(varshift.errors).values()
                if isinstance(o, type) and issubclass(o, BaseException)
                and o.__module__ == "varshift.errors"]) >= 12


def test_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "varshift", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "onnx", "onnxruntime")}


def test_old_flat_paths_are_the_new_modules():
    import varshift

    for old, new in varshift.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
