"""docs/ is the manual: docs/cli.md documents every command and option (in its options table,
for the right command) and docs/api.md every public name; every ``$ varshift ...`` command
line the README and docs/ show runs and prints what they show; no file cites a document (or
a section, or a repository path) the repo lacks; CI runs the README's test command."""

from __future__ import annotations

import dataclasses
import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import REPO
from varshift.cli import app

README = (REPO / "README.md").read_text()
CLI_MD = (REPO / "docs" / "cli.md").read_text()
COMMANDS = typer.main.get_command(app).commands
#: The pages whose command lines are run: the README and every page of docs/.
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _options(name: str) -> set[str]:
    """Every ``--option`` of a command, hidden (deprecated) ones included."""
    return {
        opt for param in COMMANDS[name].params for opt in getattr(param, "opts", [])
        if opt.startswith("--")
    }


# --------------------------------------------------------------------------- docs/cli.md


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_in_docs_cli(name: str) -> None:
    assert re.search(rf"^varshift {name}\b", CLI_MD, flags=re.M), f"docs/cli.md lacks `varshift {name}`"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_in_docs_cli(name: str) -> None:
    missing = sorted(o for o in _options(name) if o not in CLI_MD)
    assert not missing, f"docs/cli.md does not mention {missing} of `varshift {name}`"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


#: The commands that read calibration data, which docs/cli.md calls "data commands".
DATA_COMMANDS = {n for n in COMMANDS if "--batch-size" in _options(n)}


def _option_rows() -> list[tuple[set[str], set[str]]]:
    """(options named in the first cell, commands the second cell covers) per table row of
    docs/cli.md's Options section."""
    rows = []
    for line in _section(CLI_MD, "Options").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= {"-"}:
            continue
        commands = set(re.findall(rf"\b({'|'.join(COMMANDS)})\b", cells[1]))
        if re.search(r"\ball\b", cells[1]):
            commands |= set(COMMANDS)
        if "data commands" in cells[1]:
            commands |= DATA_COMMANDS
        rows.append((set(re.findall(r"--[a-z][a-z-]*", cells[0])), commands))
    return rows


def test_docs_cli_defines_data_commands() -> None:
    sentence = re.search(r'"Data commands" are the ones that read calibration data: ([^.]*)\.', CLI_MD)
    assert sentence, "docs/cli.md does not say which commands are the data commands"
    assert set(re.findall(r"[a-z]+", sentence.group(1))) - {"and"} == DATA_COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_a_row_in_docs_cli(name: str) -> None:
    """Each option of each command has a row of its own in docs/cli.md's Options table that
    names the command (or `all`, or `data commands`): its meaning and default are there."""
    rows = _option_rows()
    missing = sorted(o for o in _options(name)
                     if not any(o in opts and name in cmds for opts, cmds in rows))
    assert not missing, f"docs/cli.md's Options table has no row for {missing} of `varshift {name}`"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in README and re.search(r"^make test$", ci, flags=re.M)


def test_readme_states_what_the_setup_costs() -> None:
    """The README's two set-up commands come with their disk cost, venv by venv."""
    for venv in (".venv", ".venv-arch"):
        assert re.search(rf"^\| `{re.escape(venv)}` \|.*\| [0-9.]+ [MG]B \|", README, flags=re.M), venv
    assert "make demo" in README


# --------------------------------------------------------------------------- examples run


@dataclasses.dataclass
class Example:
    """A ``$ varshift ...`` line of a page and the output shown with it."""

    page: Path
    argv: list[str]
    expected: str
    start: int  # the output's line span in the page (for --update-golden)
    end: int
    quoted: bool  # shown as a Markdown block quote (rendered Markdown) instead of in the block


def page_examples(text: str, page: Path) -> list[Example]:
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
            examples.append(Example(page, shlex.split(command)[1:],
                                    "\n".join(lines[start:i]) + "\n", start, i, False))
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        k = j
        while k < len(lines) and lines[k].startswith(">"):
            k += 1
        quoted = [line[2:] if line.startswith("> ") else line[1:] for line in lines[j:k]]
        examples.append(Example(page, shlex.split(command)[1:], "\n".join(quoted) + "\n", j, k,
                                True))
        i = k
    return examples


EXAMPLES = [e for page in PAGES for e in page_examples(page.read_text(), page)]


def test_docs_show_commands_with_outputs() -> None:
    """The README shows a real run; with docs/cli.md, scan, probe and recalibrate are shown."""
    readme = [e.argv[0] for e in EXAMPLES if e.page.name == "README.md" and e.page.parent == REPO]
    assert readme, "the README shows no `$ varshift ...` run with its output"
    commands = [e.argv[0] for e in EXAMPLES]
    assert {"scan", "probe", "recalibrate"} <= set(commands), commands


def _example_ids() -> list[str]:
    bases = [f"{e.page.relative_to(REPO)}:{e.argv[0]}" for e in EXAMPLES]
    return [b if bases.count(b) == 1 else f"{b}-{bases[:i].count(b) + 1}"
            for i, b in enumerate(bases)]


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=_example_ids())
def test_docs_command_output(index: int, tmp_path, monkeypatch, capsys, update_golden) -> None:
    """Each command line a page shows runs, as shown, and prints exactly what the page shows.
    It runs in a scratch folder that looks like the repository root (sample_models/ linked, an
    empty out/), so outputs land there and paths print as on the page."""
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
        _rewrite_page(example, actual)
        return
    where = example.page.relative_to(REPO)
    assert actual == example.expected, f"{where}: output differs: run pytest --update-golden"


def _rewrite_page(example: Example, actual: str) -> None:
    path = example.page
    lines = path.read_text().splitlines()
    new = actual.rstrip("\n").splitlines()
    if example.quoted:
        new = [f"> {line}" if line else ">" for line in new]
    # examples are rewritten one by one: find this one's span again by its first line
    current = page_examples("\n".join(lines), path)
    match = next(e for e in current if e.argv == example.argv)
    lines[match.start:match.end] = new
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- references


LINK = re.compile(r"\]\(([^)\s]*)\)")


def _project_files() -> list:
    """Tracked files, and new ones not yet committed (those git does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return sorted({REPO / p for p in listed if (REPO / p).is_file()})


def _outside_code(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file defines: its headings' (numbered when repeated, as
    GitHub does) and explicit ``<a id=...>`` / ``<a name=...>`` ones."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in _outside_code(path.read_text(encoding="utf-8")):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading.group(1))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


def test_no_file_refers_to_documents_the_project_lacks() -> None:
    """Relative links in Markdown resolve, to a file and to a section it has, and nothing cites
    a design brief kept elsewhere."""
    briefs = ("DESIGN" + ".md", "STYLE" + ".md")  # split so this file does not cite them
    for path in _project_files():
        if path.suffix not in (".md", ".py", ".toml", ".sh", ".txt", "") or "golden" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for brief in briefs:
            assert brief not in text, f"{path.relative_to(REPO)} cites {brief}"
        if path.suffix != ".md":
            continue
        for link in LINK.findall(text):
            if "://" in link or link.startswith("mailto:"):
                continue
            target, _, anchor = link.partition("#")
            where = f"{path.relative_to(REPO)}: {link}"
            resolved = (path.parent / target) if target else path
            assert resolved.exists(), where
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{where}: no such section"


#: Where paths written in backticks may point: the repository's own folders.
REPO_PATH = re.compile(
    r"`((?:varshift|tests|scripts|bench|examples|docs|sample_models)/[^`\s<>]*?)(?::[^`\s]*)?`"
)


def test_docs_name_only_paths_that_exist() -> None:
    """Every repository file or folder the README and docs/ write in backticks exists (an old
    flat module path such as `varshift/recalib.py` would not)."""
    for page in PAGES:
        text = "\n".join(_outside_code(page.read_text()))
        for path in REPO_PATH.findall(text):
            is_file = re.search(r"\.(py|md|json|sh|yml|yaml|pt|npy|npz|png|toml|txt)$", path)
            if not (is_file or path.endswith("/")):
                continue  # a name that only looks like a path (`varshift/<layer>/shift_before`)
            if "*" in path:
                assert glob.glob(str(REPO / path)), f"{page.relative_to(REPO)}: `{path}`"
            else:
                assert (REPO / path).exists(), f"{page.relative_to(REPO)}: `{path}`"


def test_sarif_help_links_land_on_readme_sections() -> None:
    """SARIF rules link to a section of the project page, which carries the README."""
    from varshift.report.sarif import RULE_HELP

    readme_anchors = anchors(REPO / "README.md")
    for rule, (*_, anchor) in RULE_HELP.items():
        assert anchor in readme_anchors, f"{rule}: README has no section #{anchor}"


def test_every_public_name_is_in_docs_api() -> None:
    import varshift

    api = (REPO / "docs" / "api.md").read_text()
    missing = [n for n in varshift.__all__ if n != "__version__" and n not in api]
    assert not missing, missing
