"""The README documents every command and option, and CI runs the README's test command."""

from __future__ import annotations

import re

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
