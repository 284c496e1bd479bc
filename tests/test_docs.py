"""The README and docs/ document every command, option and public name; every command line
the README shows runs and prints what it shows; no file cites a document the repo lacks; CI
runs the README's test command."""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path

import pytest
import typer

from conftest import REPO
from varshift.cli import app

README = (REPO / "README.md").read_text()
COMMANDS = typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_in_the_readme(name: str) -> None:
    assert re.search(rf"^varshift {name}\b", README, flags=re.M), f"README lacks `varshift {name}`"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_in_the_readme(name: str) -> None:
    options = {
        opt for param in COMMANDS[name].params for opt in getattr(param, "opts", [])
        if opt.startswith("--")
    }
    missing = sorted(o for o in options if o not in README)
    assert not missing, f"README does not mention {missing} of `varshift {name}`"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in README and re.search(r"^make test$", ci, flags=re.M)


# --------------------------------------------------------------------------- README runs


@dataclasses.dataclass
class Example:
    """A ``$ varshift ...`` line of the README and the output shown with it."""

    argv: list[str]
    expected: str
    start: int  # the output's line span in the README (for --update-golden)
    end: int
    quoted: bool  # shown as a Markdown block quote (rendered Markdown) instead of in the block


def readme_examples(text: str) -> list[Example]:
    """Every ``$ varshift`` command in a fenced block, with its output: the rest of the block,
    or (when the block holds only the command) the block quote right after it."""
    lines = text.splitlines()
    examples = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ varshift "):
            i += 1
            continue
        command = lines[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        i += 1
        start = i
        while not lines[i].startswith("```"):
            i += 1
        if i > start:  # output inside the same block
            examples.append(Example(shlex.split(command)[1:], "\n".join(lines[start:i]) + "\n",
                                    start, i, False))
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        k = j
        while k < len(lines) and lines[k].startswith(">"):
            k += 1
        quoted = [line[2:] if line.startswith("> ") else line[1:] for line in lines[j:k]]
        examples.append(Example(shlex.split(command)[1:], "\n".join(quoted) + "\n", j, k, True))
        i = k
    return examples


EXAMPLES = readme_examples(README)


def test_readme_shows_commands_with_outputs() -> None:
    commands = [e.argv[0] for e in EXAMPLES]
    assert {"scan", "probe", "recalibrate"} <= set(commands), commands


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_command_output(index: int, tmp_path, monkeypatch, capsys, update_golden) -> None:
    """Each command line the README shows runs, as shown, and prints exactly what the README
    shows. It runs in a scratch folder that looks like the repository root (sample_models/
    linked, an empty out/), so outputs land there and paths print as in the README."""
    from varshift.cli import main

    example = EXAMPLES[index]
    (tmp_path / "sample_models").symlink_to(REPO / "sample_models")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    # An --arch file another test imported keeps its module (and the path its code reports,
    # which source lines print): import it afresh, as a user's first run does.
    samples = (REPO / "sample_models").resolve()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().parent == samples:
            monkeypatch.delitem(sys.modules, name)
    capsys.readouterr()
    code = main(example.argv)
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    actual = out
    if example.quoted:
        actual = actual.rstrip("\n") + "\n"
    if update_golden:
        _rewrite_readme(example, actual)
        return
    assert actual == example.expected, "README output differs: run pytest --update-golden"


def _rewrite_readme(example: Example, actual: str) -> None:
    path = REPO / "README.md"
    lines = path.read_text().splitlines()
    new = actual.rstrip("\n").splitlines()
    if example.quoted:
        new = [f"> {line}" if line else ">" for line in new]
    # examples are rewritten one by one: find this one's span again by its first line
    current = readme_examples("\n".join(lines))
    match = next(e for e in current if e.argv == example.argv)
    lines[match.start:match.end] = new
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- references


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _project_files() -> list:
    import subprocess

    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    return [REPO / p for p in listed if (REPO / p).is_file()]


def test_no_file_refers_to_documents_the_project_lacks() -> None:
    """Relative links in Markdown resolve, and nothing cites a design brief kept elsewhere."""
    briefs = ("DESIGN" + ".md", "STYLE" + ".md")  # split so this file does not cite them
    for path in _project_files():
        if path.suffix not in (".md", ".py", ".toml", ".sh", ".txt", "") or "golden" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for brief in briefs:
            assert brief not in text, f"{path.relative_to(REPO)} cites {brief}"
        if path.suffix == ".md":
            for target in LINK.findall(text):
                if "://" in target:
                    continue
                assert (path.parent / target).exists(), f"{path.relative_to(REPO)}: {target}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_and_option_is_in_docs_cli(name: str) -> None:
    cli_md = (REPO / "docs" / "cli.md").read_text()
    assert re.search(rf"^varshift {name}\b", cli_md, flags=re.M)
    options = {
        opt for param in COMMANDS[name].params for opt in getattr(param, "opts", [])
        if opt.startswith("--") and not getattr(param, "hidden", False)
    }
    assert not sorted(o for o in options if o not in cli_md)


def test_every_public_name_is_in_docs_api() -> None:
    import varshift

    api = (REPO / "docs" / "api.md").read_text()
    missing = [n for n in varshift.__all__ if n != "__version__" and n not in api]
    assert not missing, missing
