"""The command line. Each command: parse -> one library call -> render.

No torch (or onnx) import at module level: ``varshift --help`` and ``--version`` stay instant.
Exit codes (DESIGN.md): 0 ok; 1 findings/shifts at the threshold or a failed parity check;
2 bad input or usage (one line on stderr); 3 an internal error (a bug: traceback kept).
"""

from __future__ import annotations

import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ._version import __version__
from .errors import VarshiftError

app = typer.Typer(
    name="varshift",
    help="Find, measure and fix the variance shift that dropout causes in BatchNorm layers.",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Format(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


class FailOn(str, Enum):
    error = "error"
    warning = "warning"
    never = "never"


# Shared options. Paths are plain strings: varshift checks them itself, with its own messages.
ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="torch.save file: a whole module, or a state dict / checkpoint with --arch.",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    Optional[str],
    typer.Option("--arch", help="Builds the module for a state dict: pkg.module:fn or file.py:fn."),
]
ArchArgsOpt = Annotated[
    Optional[str], typer.Option("--arch-args", help="JSON object of keyword arguments for --arch.")
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust", help="Allow full unpickling (runs code from the file). Trusted files only."),
]
InputShapeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--input-shape",
        help="Example input shape, e.g. 1,3,224,224: traces models that torch.fx cannot.",
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", help="Report format on stdout.")]
ReportOpt = Annotated[
    Optional[str],
    typer.Option("--report", help="Also write the report to FILE (.json, .md, else --format)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stdout.")]


def _version_callback(value: bool) -> None:
    if value:
        print(f"varshift {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", is_eager=True,
                     callback=_version_callback),
    ] = False,
) -> None:
    """Find, measure and fix the variance shift that dropout causes in BatchNorm layers."""


# --------------------------------------------------------------------------- shared steps


def _load(model: str, arch: str | None, arch_args: str | None, trust: bool):
    from .loading import load_model, parse_arch_args

    return load_model(model, arch=arch, arch_args=parse_arch_args(arch_args), trust=trust)


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip() != "")
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise VarshiftError(
            f"--input-shape {text!r} must be comma-separated positive integers, e.g. 1,3,224,224"
        )
    return shape


def _check_report_path(report: str | None, inputs: tuple = ()) -> None:
    if report:
        from ._io import check_output_path

        check_output_path(report, "--report", inputs)


def _emit(rep: Any, fmt: Format, report_file: str | None, quiet: bool) -> None:
    from ._io import write_text_atomic
    from .render import format_for_path, make_console, render_to_string, text

    if report_file:
        write_text_atomic(report_file, render_to_string(rep, format_for_path(report_file, fmt.value)))
    if quiet:
        return
    if fmt is Format.text:
        make_console().print(text(rep))
    else:
        sys.stdout.write(render_to_string(rep, fmt.value))
        sys.stdout.flush()


# --------------------------------------------------------------------------- commands


@app.command()
def scan(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_args: ArchArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = None,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="Exit 1 when a finding reaches this severity.")
    ] = FailOn.error,
    format: FormatOpt = Format.text,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Find every dropout-like layer that reaches a BatchNorm, from the dataflow graph."""
    shape = _parse_shape(input_shape)
    _check_report_path(report, (model,))
    loaded = _load(model, arch, arch_args, trust)
    from .inputs import example_input
    from .rules import scan as scan_model

    rep = scan_model(loaded.module, example_input(loaded.module, shape) if shape else None)
    rep.source = model
    rep.notes[:0] = loaded.notes
    _emit(rep, format, report, quiet)
    return 1 if rep.failed(fail_on.value) else 0


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (for tests and ``run``)."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="varshift", standalone_mode=False)
    except VarshiftError as exc:
        print(f"varshift: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("varshift: interrupted; no output was written", file=sys.stderr)
        return 130
    except typer.Abort:
        print("varshift: aborted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except Exception as exc:
        # click/typer usage errors (unknown option, bad choice, missing argument): one line.
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"varshift: error: {exc.format_message()}", file=sys.stderr)
            return int(exc.exit_code)
        traceback.print_exc()
        print(
            f"varshift: internal error ({type(exc).__name__}); this is a bug in varshift "
            f"{__version__}, please report it with the traceback above",
            file=sys.stderr,
        )
        return 3
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
