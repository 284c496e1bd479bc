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
    typer.Option("--arch", metavar="SPEC", help="Builds the module for a state dict: pkg.module:fn or file.py:fn."),
]
ArchArgsOpt = Annotated[
    Optional[str], typer.Option("--arch-args", metavar="JSON", help="JSON object of keyword arguments for --arch.")
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust", help="Allow full unpickling (runs code from the file). Trusted files only."),
]
InputShapeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--input-shape",
        metavar="SHAPE",
        help="Example input shape, e.g. 1,3,224,224: traces models that torch.fx cannot.",
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", help="Report format on stdout.")]
ReportOpt = Annotated[
    Optional[str],
    typer.Option("--report", metavar="FILE", help="Also write the report to FILE (.json, .md, else --format)."),
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


def _check_outputs(inputs: tuple, *outputs: tuple[str, str | None]) -> None:
    """Before any work: every output path is writable, is none of the input files (model,
    data), and no two outputs are the same file."""
    from ._io import check_output_path

    seen: dict[str, str] = {}
    for what, path in outputs:
        if path:
            check_output_path(path, what, tuple(i for i in inputs if i))
            key = str(Path(path).resolve())
            if key in seen:
                raise VarshiftError(f"{what} and {seen[key]} are the same file: {path}")
            seen[key] = what


def _emit(rep: Any, fmt: Format, report_file: str | None, quiet: bool) -> None:
    from ._io import write_text_atomic
    from .render import format_for_path, make_console, render_to_string, text

    if report_file:
        write_text_atomic(report_file, render_to_string(rep, format_for_path(report_file, fmt.value)))
    if quiet:
        return
    if fmt is Format.text and sys.stdout.isatty():
        make_console().print(text(rep))  # colour and the terminal's width
    else:  # pipes, files and CI logs: plain text, the same bytes as --report writes
        sys.stdout.write(render_to_string(rep, fmt.value, width=make_console().width))
        sys.stdout.flush()


# --------------------------------------------------------------------------- commands

MaxSamplesOpt = Annotated[
    Optional[int],
    typer.Option("--max-samples", metavar="N", help="Use at most N samples (the last batch cut)."),
]
CallOpt = Annotated[
    Optional[str],
    typer.Option("--call", metavar="SPEC",
                 help="pkg.module:fn or file.py:fn; fn(model, batch) returns the output or (output, labels)."),
]
OutputKeyOpt = Annotated[
    Optional[str],
    typer.Option("--output-key", metavar="KEY", help="The model output that holds the logits (default: logits, else the first tensor)."),
]


class LabelsMode(str, Enum):
    auto = "auto"
    none = "none"
    last = "last"


LabelsOpt = Annotated[
    LabelsMode,
    typer.Option("--labels", help="Tuple batches: auto, none (every item is an input) or last (the last item is the labels)."),
]


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run: cpu, cuda, or auto.")]



@app.command()
def scan(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_args: ArchArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = None,
    data: Annotated[
        Optional[str],
        typer.Option("--data", metavar="DATA", help="Trace with the first batch of DATA (models that need real inputs)."),
    ] = None,
    call: CallOpt = None,
    labels: LabelsOpt = LabelsMode.auto,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="Exit 1 when a finding reaches this severity.")
    ] = FailOn.error,
    format: FormatOpt = Format.text,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Find every dropout-like layer that reaches a BatchNorm, from the dataflow graph."""
    shape = _parse_shape(input_shape)
    if shape and data:
        raise VarshiftError("--input-shape and --data both give the example input; pass one")
    _check_outputs((model, data), ("--report", report))
    loaded = _load(model, arch, arch_args, trust)
    from .inputs import example_input
    from .rules import scan as scan_model

    example = example_input(loaded.module, shape) if shape else None
    if data:
        example = _first_batch(_data(data, 64, 1))
    rep = scan_model(loaded.module, example, call=call, labels=labels.value)
    rep.source = model
    rep.notes[:0] = loaded.notes
    _emit(rep, format, report, quiet)
    return 1 if rep.failed(fail_on.value) else 0


def _first_batch(batches):
    """The first batch of DATA, whole (as the source produced it)."""
    for batch in batches:
        return batch.raw
    raise VarshiftError("DATA yielded no batches")


DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        metavar="DATA",
        help="Calibration data: .pt, .npy, .npz, or pkg.module:callable returning batches.",
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", metavar="N", help="Samples per batch for file data.")]
MaxBatchesOpt = Annotated[
    Optional[int], typer.Option("--max-batches", metavar="N", help="Use at most N batches.")
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Seeds the train-mode pass (dropout masks).")]


def _device(choice: Device):
    import torch

    if choice is Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice is Device.cuda and not torch.cuda.is_available():
        raise VarshiftError("--device cuda: CUDA is not available here; use --device cpu or auto")
    return torch.device(choice.value)


def _data(spec: str, batch_size: int, max_batches: int | None, max_samples: int | None = None):
    from .data import load_data

    return load_data(spec, batch_size=batch_size, max_batches=max_batches, max_samples=max_samples)


class _Progress:
    """Batch progress on stderr, only when stderr is a terminal (never in CI logs)."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label = label
        self.enabled = not quiet and sys.stderr.isatty()
        self._progress = None
        self._task = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._progress = Progress(console=Console(stderr=True), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


@app.command()
def probe(
    model: ModelArg,
    data: DataOpt,
    arch: ArchOpt = None,
    arch_args: ArchArgsOpt = None,
    trust: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    max_batches: MaxBatchesOpt = None,
    max_samples: MaxSamplesOpt = None,
    call: CallOpt = None,
    labels: LabelsOpt = LabelsMode.auto,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    fail_above: Annotated[
        Optional[float],
        typer.Option("--fail-above", help="Exit 1 when any layer's shift reaches RATIO.",
                     metavar="RATIO"),
    ] = None,
    format: FormatOpt = Format.text,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Measure each BatchNorm layer's variance shift on calibration data."""
    if fail_above is not None and not fail_above >= 1.0:
        raise VarshiftError(f"--fail-above must be a ratio >= 1.0, got {fail_above}")
    _check_outputs((model, data), ("--report", report))
    dev = _device(device)
    loaded = _load(model, arch, arch_args, trust)
    batches = _data(data, batch_size, max_batches, max_samples)
    from .probing import probe as probe_model

    with _Progress("probing", quiet) as progress:
        rep = probe_model(
            loaded.module.to(dev), batches, seed=seed, device=dev, progress=progress,
            threshold=fail_above or 1.1, call=call, labels=labels.value,
        )
    rep.source = model
    rep.notes[:0] = loaded.notes
    _emit(rep, format, report, quiet)
    return 1 if fail_above is not None and rep.failed(fail_above) else 0


OutputOpt = Annotated[
    str, typer.Option("--output", "-o", metavar="OUT", help="Where to write the result.", show_default=False)
]
OnnxOpt = Annotated[
    Optional[str],
    typer.Option("--onnx", metavar="OUT.onnx", help="Also export the result to this ONNX file and check parity."),
]
EvalDataOpt = Annotated[
    Optional[str],
    typer.Option("--eval-data", metavar="DATA", help="Held-out labelled data for accuracy and NLL before/after."),
]
ExactOpt = Annotated[
    bool,
    typer.Option("--exact", help="Statistics on the inference path, level by level (shift 1.000)."),
]


def _onnx(fixed, out: str | None, batches, labels: str = "auto"):
    if not out:
        return None
    from .export import export_onnx

    return export_onnx(fixed, out, batches=batches, labels=labels)


@app.command()
def recalibrate(
    model: ModelArg,
    data: DataOpt,
    output: OutputOpt,
    exact: ExactOpt = False,
    all_norms: Annotated[
        bool, typer.Option("--all-norms", help="Recalibrate every BatchNorm, not only affected ones.")
    ] = False,
    include_frozen: Annotated[
        bool, typer.Option("--include-frozen", help="Also recalibrate frozen BatchNorms (FrozenBatchNorm2d, momentum=0).")
    ] = False,
    eval_data: EvalDataOpt = None,
    onnx: OnnxOpt = None,
    arch: ArchOpt = None,
    arch_args: ArchArgsOpt = None,
    trust: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    max_batches: MaxBatchesOpt = None,
    max_samples: MaxSamplesOpt = None,
    call: CallOpt = None,
    labels: LabelsOpt = LabelsMode.auto,
    output_key: OutputKeyOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    format: FormatOpt = Format.text,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Recompute BatchNorm statistics with dropout off; write the model in its own form."""
    _check_outputs((model, data, eval_data), ("--output", output), ("--onnx", onnx),
                   ("--report", report))
    dev = _device(device)
    loaded = _load(model, arch, arch_args, trust)
    batches = _data(data, batch_size, max_batches, max_samples)
    held_out = _data(eval_data, batch_size, None) if eval_data else None
    from .recalib import recalibrate as recalibrate_model
    from .saving import norm_buffer_keys, save_like

    with _Progress("recalibrating", quiet) as progress:
        fixed, rep = recalibrate_model(
            loaded.module.to(dev), batches, exact=exact, all_norms=all_norms, inplace=True,
            eval_batches=held_out, device=dev, progress=progress, call=call,
            labels=labels.value, output_key=output_key, include_frozen=include_frozen,
        )
    fixed = fixed.cpu()
    changed = norm_buffer_keys([l.name for l in rep.recalibrated], fixed)
    save_like(loaded, fixed, output, changed)
    rep.output, rep.source = output, model
    rep.notes[:0] = loaded.notes
    rep.onnx = _onnx(fixed, onnx, batches, labels.value)
    _emit(rep, format, report, quiet)
    return 0 if rep.onnx is None or rep.onnx else 1


@app.command()
def swap(
    model: ModelArg,
    output: OutputOpt,
    to: Annotated[str, typer.Option("--to", help="The replacement (only: uout).")] = "uout",
    beta: Annotated[float, typer.Option("--beta", help="Uout noise half-width.")] = 0.1,
    data: Annotated[
        Optional[str], typer.Option("--data", metavar="DATA", help="Also recalibrate on this data.")
    ] = None,
    exact: ExactOpt = False,
    eval_data: EvalDataOpt = None,
    onnx: OnnxOpt = None,
    arch: ArchOpt = None,
    arch_args: ArchArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: InputShapeOpt = None,
    batch_size: BatchSizeOpt = 64,
    max_batches: MaxBatchesOpt = None,
    max_samples: MaxSamplesOpt = None,
    call: CallOpt = None,
    labels: LabelsOpt = LabelsMode.auto,
    output_key: OutputKeyOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    format: FormatOpt = Format.text,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Replace the dropout-like layers that reach a BatchNorm with Uout."""
    shape = _parse_shape(input_shape)
    _check_outputs((model, data, eval_data), ("--output", output), ("--onnx", onnx),
                   ("--report", report))
    if eval_data and not data:
        raise VarshiftError("--eval-data needs --data (it measures the recalibration)")
    if onnx and not (data or shape):
        raise VarshiftError("--onnx needs --data or --input-shape to build the inputs it checks")
    dev = _device(device)
    loaded = _load(model, arch, arch_args, trust)
    batches = _data(data, batch_size, max_batches, max_samples) if data else None
    held_out = _data(eval_data, batch_size, None) if eval_data else None
    from ._io import write_with
    from .inputs import example_input
    from .swapping import swap as swap_model

    example = example_input(loaded.module, shape) if shape else None
    if example is None and batches is not None:
        example = _first_batch(batches)
    swapped, rep = swap_model(loaded.module, to=to, beta=beta, inplace=True, example_input=example,
                              call=call, labels=labels.value)
    if batches is not None:
        from .recalib import recalibrate as recalibrate_model

        with _Progress("recalibrating", quiet) as progress:
            swapped, rep.recalibration = recalibrate_model(
                swapped.to(dev), batches, exact=exact, inplace=True, eval_batches=held_out,
                device=dev, progress=progress, call=call, labels=labels.value,
                output_key=output_key,
            )
        swapped = swapped.cpu()
    import torch

    write_with(output, lambda tmp: torch.save(swapped, tmp))
    rep.output, rep.source = output, model
    rep.notes[:0] = loaded.notes
    if loaded.form != "module":
        rep.notes.append(
            f"{model} is a checkpoint, which cannot carry new layers: the output is a whole "
            "module; to keep training from a checkpoint, build the model with varshift.Uout in "
            "place of the swapped layers"
        )
    if rep.graph_module or loaded.form != "module":
        rep.notes.append("loading the output needs --trust (it holds code or classes beyond torch.nn)")
    rep.onnx = _onnx(swapped, onnx, batches if batches is not None else [example], labels.value)
    _emit(rep, format, report, quiet)
    return 0 if rep.onnx is None or rep.onnx else 1


@app.command()
def export(
    model: ModelArg,
    output: OutputOpt,
    data: Annotated[
        Optional[str], typer.Option("--data", metavar="DATA", help="Check parity on these batches.")
    ] = None,
    input_shape: InputShapeOpt = None,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance.")] = 1e-3,
    arch: ArchOpt = None,
    arch_args: ArchArgsOpt = None,
    trust: TrustOpt = False,
    batch_size: BatchSizeOpt = 64,
    max_batches: MaxBatchesOpt = None,
    max_samples: MaxSamplesOpt = None,
    labels: LabelsOpt = LabelsMode.auto,
    seed: SeedOpt = 0,
    device: DeviceOpt = Device.auto,
    format: FormatOpt = Format.text,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> int:
    """Export to ONNX (eval mode, dynamic batch) and check the outputs in onnxruntime."""
    shape = _parse_shape(input_shape)
    if not data and not shape:
        raise VarshiftError("export needs --data DATA or --input-shape (e.g. 1,3,224,224) "
                            "to build the inputs it checks")
    if atol < 0 or rtol < 0:
        raise VarshiftError(f"--atol and --rtol must be >= 0, got {atol} and {rtol}")
    _check_outputs((model, data), ("--output", output), ("--report", report))
    loaded = _load(model, arch, arch_args, trust)
    batches = _data(data, batch_size, max_batches, max_samples) if data else None
    from .export import export_onnx
    from .inputs import example_input

    example = example_input(loaded.module, shape, seed=seed) if shape else None
    rep = export_onnx(loaded.module, output, example, batches=batches, atol=atol, rtol=rtol,
                      labels=labels.value)
    rep.source = model
    _emit(rep, format, report, quiet)
    return 0 if rep else 1


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
        rv = int(getattr(exc, "exit_code", 0) or 0)
    except Exception as exc:
        # click/typer usage errors (unknown option, bad choice, missing argument): one line.
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `varshift`: help, not an error
                print(exc.format_message(), file=sys.stderr)
                return int(exc.exit_code)
            print(f"varshift: error: {exc.format_message()}", file=sys.stderr)
            return int(exc.exit_code)
        traceback.print_exc()
        print(
            f"varshift: internal error ({type(exc).__name__}); this is a bug in varshift "
            f"{__version__}, please report it with the traceback above",
            file=sys.stderr,
        )
        return 3
    if rv == 130:
        # typer turns Ctrl-C into exit code 130 (no command of ours returns it); say so.
        # Outputs are written atomically, so nothing partial was left behind.
        print("varshift: interrupted; no output was written", file=sys.stderr)
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
