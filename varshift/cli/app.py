"""The command line. Each command: parse -> one library call (:mod:`varshift.files`) -> render.

No torch (or onnx) import at module level: ``varshift --help`` and ``--version`` stay instant.
Exit codes (docs/cli.md): 0 when the report passes (``bool(report)``); 1 when it does not
(findings or shifts at the threshold, a failed accuracy guard or parity check); 2 bad input or
usage (one line on stderr); 130 interrupted; 3 an internal error (a bug: traceback kept).
Paths are plain strings: varshift checks them itself, with its own messages.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Callable, Optional, get_type_hints

import typer

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as _click
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as _click
    from click import get_current_context

from .._version import __version__
from ..errors import Terminated, VarshiftError
from ..options import CallSpec, DataSpec, Labels, ModelSpec, RecalibrateOptions, RunSpec, Session
from .terms import flags, localize

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
    sarif = "sarif"


class FailOn(str, Enum):
    error = "error"
    warning = "warning"
    never = "never"


def _sarif_only_for_scan(ctx: typer.Context, param: Any, value: Any) -> Any:
    """SARIF describes findings in source files: only scan has them. Refused before any work."""
    text = getattr(value, "value", value) or ""
    sarif = text == "sarif" or str(text).lower().endswith((".sarif", ".sarif.json"))
    if sarif and ctx.info_name != "scan":
        raise typer.BadParameter("SARIF is only for `varshift scan` (use json, markdown or .html)")
    return value


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


# --------------------------------------------------------------------------- option groups
#
# Options shared by several commands are declared once, as a dataclass whose fields carry the
# typer metadata (Polygraphy's argument groups). A command takes the group as one parameter;
# ``_command`` expands it into the group's options for typer and hands the command the built
# dataclass. Adding an option to a group adds it to every command that takes the group.

ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="torch.save file: a whole module, or a state dict / checkpoint with --arch.",
        show_default=False,
    ),
]


@dataclass
class ModelOptions:
    """How to load MODEL (every command)."""

    arch: Annotated[
        Optional[str],
        typer.Option("--arch", metavar="SPEC",
                     help="Builds the module for a state dict: pkg.module:fn or file.py:fn."),
    ] = None
    arch_args: Annotated[
        Optional[str],
        typer.Option("--arch-args", metavar="JSON", help="JSON object of keyword arguments for --arch."),
    ] = None
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Allow full unpickling (runs code from the file). Trusted files only."),
    ] = False

    def spec(self, model: str) -> ModelSpec:
        return ModelSpec(model, self.arch, self.arch_args, self.trust)


class LabelsMode(str, Enum):
    auto = "auto"
    none = "none"
    last = "last"


@dataclass
class DataOptions:
    """How to read DATA and where to run (commands that read calibration data)."""

    batch_size: Annotated[
        int, typer.Option("--batch-size", metavar="N", help="Samples per batch for file data.")
    ] = 64
    max_batches: Annotated[
        Optional[int], typer.Option("--max-batches", metavar="N", help="Use at most N batches.")
    ] = None
    device: Annotated[
        Optional[str],
        typer.Option("--device", metavar="cpu|cuda|cuda:K|auto",
                     help="Where to run (default: auto; under torchrun cuda is cuda:LOCAL_RANK).",
                     show_default=False),
    ] = None

    max_samples: Annotated[
        Optional[int],
        typer.Option("--max-samples", metavar="N", help="Use at most N samples (the last batch cut)."),
    ] = None
    labels: Annotated[
        LabelsMode,
        typer.Option("--labels", help="Tuple batches: auto, none (every item is an input) or "
                     "last (the last item is the labels)."),
    ] = LabelsMode.auto

    def spec(self, data: str) -> DataSpec:
        """How to read ``data``."""
        return DataSpec(data, batch_size=self.batch_size, max_batches=self.max_batches,
                        max_samples=self.max_samples)

    def optional(self, data: str | None) -> DataSpec | None:
        """How to read ``data`` (None without data: an optional ``--data``)."""
        return None if data is None else self.spec(data)

    def calling(self, call: str | None = None, output_key: str | None = None) -> CallSpec:
        return CallSpec(call, Labels(self.labels.value), output_key)

    def run(self, backend: str | None, progress: Any) -> RunSpec:
        """Where to run; a process group started under torchrun is left in this command's
        :class:`Session` (``main`` ends it)."""
        session = get_current_context().obj
        return RunSpec(self.device or "auto", backend, progress, session)


@dataclass
class OutputOptions:
    """How to show the report (every command)."""

    format: Annotated[
        Format, typer.Option("--format", help="Report format on stdout (sarif: scan only).",
                             callback=_sarif_only_for_scan)
    ] = Format.text
    report: Annotated[
        Optional[str],
        typer.Option("--report", metavar="FILE", callback=_sarif_only_for_scan,
                     help="Also write the report to FILE (.json, .md, .sarif, .html, else --format)."),
    ] = None
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stdout.")] = False


_GROUPS = (ModelOptions, DataOptions, OutputOptions)


def _command(fn: Callable[..., int]) -> Callable[..., int]:
    """Register ``fn`` as a command, with every option-group parameter expanded."""
    hints = get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for p in inspect.signature(fn).parameters.values():
        hint = hints.get(p.name, p.annotation)
        if hint in _GROUPS:
            fields = get_type_hints(hint, include_extras=True)
            names = [f.name for f in dataclasses.fields(hint)]
            params += [
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                  annotation=fields[f.name])
                for f in dataclasses.fields(hint)
            ]
            groups[p.name] = (hint, names)
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hint))

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> int:
        for group, (cls, names) in groups.items():
            kwargs[group] = cls(**{n: kwargs.pop(n) for n in names})
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return app.command()(wrapper)


InputShapeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--input-shape",
        metavar="SHAPE",
        help="Example input shape, e.g. 1,3,224,224: traces models that torch.fx cannot.",
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        metavar="DATA",
        help="Calibration data: .pt, .npy, .npz, or pkg.module:callable returning batches.",
        show_default=False,
    ),
]
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
    typer.Option("--exact", help="Statistics on the inference path (shift 1.000), in about one pass."),
]
CacheMbOpt = Annotated[
    Optional[float],
    typer.Option("--cache-mb", metavar="MB", show_default=False,
                 help="With --exact: memory for the activations it keeps between norms "
                 "(default: half the available memory); beyond it they go to a temporary "
                 "directory."),
]
FailAboveOpt = Annotated[
    float,
    typer.Option("--fail-above", metavar="RATIO",
                 help="Exit 1 when a layer's shift reaches RATIO (inf: never)."),
]
#: torch's generators take seeds in [0, 2**64): a larger --seed is a usage error, not a crash.
SEED_MAX = 2**64 - 1
ExampleSeedOpt = Annotated[
    int, typer.Option("--seed", metavar="N", min=0, max=SEED_MAX,
                      help="Seeds the random example input of --input-shape.")
]
CallOpt = Annotated[
    Optional[str],
    typer.Option("--call", metavar="SPEC",
                 help="pkg.module:fn or file.py:fn; fn(model, batch) returns the output or "
                 "(output, labels)."),
]
OutputKeyOpt = Annotated[
    Optional[str],
    typer.Option("--output-key", metavar="KEY",
                 help="The model output that holds the logits (default: logits, else the first "
                 "tensor)."),
]
BackendOpt = Annotated[
    Optional[str],
    typer.Option("--backend", metavar="NAME",
                 help="torch.distributed backend under torchrun (default: nccl on CUDA, else gloo)."),
]
# Kept so that old command lines still run; it never did anything there.
DeprecatedSeedOpt = Annotated[Optional[int], typer.Option("--seed", hidden=True)]


def _warn(message: str) -> None:
    print(f"varshift: warning: {message}", file=sys.stderr)


def _emit(rep: Any, out: OutputOptions) -> int:
    """Render ``rep`` (stdout, and --report); the exit code: 0 when ``bool(rep)``, else 1."""
    from ..io.atomic import write_text_atomic
    from ..measure.distributed import env_rank
    from ..report.render import format_for_path, make_console, render_to_string, text

    if env_rank() != 0:  # under torchrun, rank 0 speaks for all (every rank has the report)
        return 0 if rep else 1
    rep = localize(rep)  # the report's advice in flags, not in library parameters
    if out.report:
        write_text_atomic(out.report, render_to_string(rep, format_for_path(out.report, out.format.value)))
    if not out.quiet:
        if out.format is Format.text and sys.stdout.isatty():
            make_console().print(text(rep))  # colour and the terminal's width
        else:  # pipes, files and CI logs: plain text, the same bytes as --report writes
            sys.stdout.write(render_to_string(rep, out.format.value, width=make_console().width))
            sys.stdout.flush()
    return 0 if rep else 1


class _Progress:
    """Batch progress on stderr, only when stderr is a terminal (never in CI logs)."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label = label
        self.enabled = not quiet and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None

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

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


# --------------------------------------------------------------------------- commands


@_command
def scan(
    model: ModelArg,
    input_shape: InputShapeOpt = None,
    data: Annotated[
        Optional[str],
        typer.Option("--data", metavar="DATA",
                     help="Trace with the first batch of DATA (models that need real inputs)."),
    ] = None,
    call: CallOpt = None,
    labels: Annotated[
        LabelsMode,
        typer.Option("--labels", help="Tuple batches of --data: auto, none or last."),
    ] = LabelsMode.auto,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="Exit 1 when a finding reaches this severity.")
    ] = FailOn.error,
    model_opts: ModelOptions = ModelOptions(),
    out: OutputOptions = OutputOptions(),
) -> int:
    """Find every dropout-like layer that reaches a BatchNorm, from the dataflow graph."""
    from ..files import Example, Outputs, run_scan

    how = CallSpec(call, Labels(labels.value))
    return _emit(run_scan(model_opts.spec(model), how, Example(input_shape), data, fail_on.value,
                          Outputs(report=out.report)), out)


@_command
def probe(
    model: ModelArg,
    data: DataOpt,
    seed: Annotated[int, typer.Option("--seed", metavar="N", min=0, max=SEED_MAX,
                                      help="Seeds the train-mode pass (dropout masks).")] = 0,
    fail_above: FailAboveOpt = 1.1,
    call: CallOpt = None,
    backend: BackendOpt = None,
    model_opts: ModelOptions = ModelOptions(),
    data_opts: DataOptions = DataOptions(),
    out: OutputOptions = OutputOptions(),
) -> int:
    """Measure each BatchNorm layer's variance shift on calibration data."""
    from ..files import Outputs, run_probe

    with _Progress("probing", out.quiet) as progress:
        rep = run_probe(model_opts.spec(model), data_opts.spec(data), data_opts.calling(call),
                        data_opts.run(backend, progress), seed, fail_above,
                        Outputs(report=out.report))
    return _emit(rep, out)


@_command
def recalibrate(
    model: ModelArg,
    data: DataOpt,
    output: OutputOpt,
    exact: ExactOpt = False,
    cache_mb: CacheMbOpt = None,
    all_norms: Annotated[
        bool, typer.Option("--all-norms", help="Recalibrate every BatchNorm, not only affected ones.")
    ] = False,
    eval_data: EvalDataOpt = None,
    onnx: OnnxOpt = None,
    fail_above: Annotated[
        float,
        typer.Option("--fail-above", metavar="RATIO",
                     help="Exit 1 when a recalibrated layer's shift afterwards reaches RATIO."),
    ] = 1.1,
    max_accuracy_drop: Annotated[
        Optional[float],
        typer.Option("--max-accuracy-drop", metavar="PCT",
                     help="Exit 1 when accuracy falls by more than PCT percentage points."),
    ] = None,
    include_frozen: Annotated[
        bool, typer.Option("--include-frozen",
                           help="Also recalibrate frozen BatchNorms (FrozenBatchNorm2d, momentum=0).")
    ] = False,
    call: CallOpt = None,
    output_key: OutputKeyOpt = None,
    seed: DeprecatedSeedOpt = None,
    backend: BackendOpt = None,
    model_opts: ModelOptions = ModelOptions(),
    data_opts: DataOptions = DataOptions(),
    out: OutputOptions = OutputOptions(),
) -> int:
    """Recompute BatchNorm statistics with dropout off; write the model in its own form."""
    from ..files import Outputs, run_recalibrate

    if seed is not None:
        _warn("--seed does nothing for recalibrate (it draws nothing at random) and will be removed")
    fix = RecalibrateOptions(exact=exact, cache_mb=cache_mb, all_norms=all_norms,
                             include_frozen=include_frozen, threshold=fail_above,
                             max_accuracy_drop=max_accuracy_drop)
    with _Progress("recalibrating", out.quiet) as progress:
        rep = run_recalibrate(model_opts.spec(model), data_opts.spec(data), fix,
                              data_opts.calling(call, output_key), data_opts.run(backend, progress),
                              eval_data, Outputs(output, onnx, out.report))
    return _emit(rep, out)


@_command
def swap(
    model: ModelArg,
    output: OutputOpt,
    to: Annotated[str, typer.Option("--to", help="The replacement (only: uout).")] = "uout",
    beta: Annotated[float, typer.Option("--beta", help="Uout noise half-width.")] = 0.1,
    data: Annotated[
        Optional[str], typer.Option("--data", metavar="DATA", help="Also recalibrate on this data.")
    ] = None,
    exact: ExactOpt = False,
    cache_mb: CacheMbOpt = None,
    eval_data: EvalDataOpt = None,
    onnx: OnnxOpt = None,
    input_shape: InputShapeOpt = None,
    seed: ExampleSeedOpt = 0,
    call: CallOpt = None,
    output_key: OutputKeyOpt = None,
    backend: BackendOpt = None,
    model_opts: ModelOptions = ModelOptions(),
    data_opts: DataOptions = DataOptions(),
    out: OutputOptions = OutputOptions(),
) -> int:
    """Replace the dropout-like layers that reach a BatchNorm with Uout."""
    from ..files import Example, Outputs, SwapOptions, run_swap

    with _Progress("recalibrating", out.quiet) as progress:
        rep = run_swap(model_opts.spec(model), SwapOptions(to, beta, Example(input_shape, seed)),
                       data_opts.optional(data), eval_data,
                       RecalibrateOptions(exact=exact, cache_mb=cache_mb),
                       data_opts.calling(call, output_key), data_opts.run(backend, progress),
                       Outputs(output, onnx, out.report))
    return _emit(rep, out)


@_command
def export(
    model: ModelArg,
    output: OutputOpt,
    data: Annotated[
        Optional[str], typer.Option("--data", metavar="DATA", help="Check parity on these batches.")
    ] = None,
    input_shape: InputShapeOpt = None,
    seed: ExampleSeedOpt = 0,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance.")] = 1e-3,
    model_opts: ModelOptions = ModelOptions(),
    data_opts: DataOptions = DataOptions(),
    out: OutputOptions = OutputOptions(),
) -> int:
    """Export to ONNX (eval mode, dynamic batch) and check the outputs in onnxruntime."""
    from ..files import Example, Outputs, run_export

    if data_opts.device is not None:
        from ..files import resolve_device

        resolve_device(data_opts.device)  # refused where unavailable, as by every command
        _warn("--device does nothing for export (the export and its check run on the CPU) "
              "and will be removed")
    rep = run_export(model_opts.spec(model), data_opts.optional(data), Example(input_shape, seed),
                     (atol, rtol), data_opts.calling(), Outputs(output, report=out.report))
    return _emit(rep, out)


# --------------------------------------------------------------------------- entry point


#: Signals handled like SIGINT: exit code 128 + the signal's number (143, 129).
_SIGNALS = ("SIGTERM", "SIGHUP")


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


class _SignalsAsExceptions:
    """Install the SIGTERM/SIGHUP handlers for the duration of one ``main()`` call and put
    the previous ones back (tests call ``main`` in-process). Only in the main thread, where
    Python delivers signals; elsewhere it does nothing."""

    def __enter__(self) -> "_SignalsAsExceptions":
        import signal
        import threading

        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in _SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._old[signum] = signal.signal(signum, _raise_terminated)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for signum, handler in self._old.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (for tests and ``run``).

    SIGINT, SIGTERM and SIGHUP stop the run with one line on stderr and exit codes 130, 143
    and 129; temporary files are removed on the way out, so no output is left behind.

    Under torchrun every rank runs this; the ranks agree on one exit code and one error line
    (the lowest failing rank's), which rank 0 prints.
    """
    session = Session()  # a command run under torchrun leaves its process group here
    with _SignalsAsExceptions():
        try:
            code, line = _outcome(argv, session)
        except Terminated as exc:  # arrived outside the command
            code, line = _terminated(exc.signum)
        d = session.dist
        if d is not None:
            from ..measure.distributed import shutdown

            code, line = d.finish(code, line)
            shutdown(d)
            if d.rank != 0:
                return code
        if line:
            print(line, file=sys.stderr)
        return code


def _terminated(signum: int) -> tuple[int, str]:
    import signal

    name = signal.Signals(signum).name
    return 128 + signum, f"varshift: terminated by {name}; {_outputs_state()}"


def _outputs_state() -> str:
    from ..io.atomic import outputs_committed

    return ("it arrived after the outputs were complete" if outputs_committed()
            else "no output was written")


def _outcome(argv: list[str] | None, session: Session) -> tuple[int, str | None]:
    """Run the command: its exit code and the one line for stderr (None when silent)."""
    from ..io.atomic import transaction

    command = typer.main.get_command(app)
    try:
        # One output transaction for the whole command: the model, --onnx and --report files
        # are renamed into place together at the end, or none of them is.
        with transaction():
            rv = command.main(args=argv, prog_name="varshift", standalone_mode=False,
                              obj=session)
    except VarshiftError as exc:
        return 2, f"varshift: error: {flags(str(exc))}"
    except KeyboardInterrupt:
        return 130, f"varshift: interrupted; {_outputs_state()}"
    except Terminated as exc:
        return _terminated(exc.signum)
    except SystemExit as exc:
        # click itself never raises SystemExit with standalone_mode=False: this came from
        # user code (an --arch builder, a data callable, a model's forward) that called
        # sys.exit(). An error in the user's code, not varshift's exit code.
        return 2, (f"varshift: error: user code called sys.exit({exc.code!r}) (an --arch "
                   "builder, a data callable or the model itself); no output was written")
    except typer.Abort:
        return 130, "varshift: aborted"
    except typer.Exit as exc:
        rv = int(getattr(exc, "exit_code", 0) or 0)
    except _click.ClickException as exc:
        message, code = exc.format_message(), int(exc.exit_code)
        if isinstance(exc, getattr(_click, "NoArgsIsHelpError", ())):  # bare `varshift`: help
            return code, message
        # usage errors (unknown option, bad choice, missing argument): one line
        return code, f"varshift: error: {message}"
    except Exception as exc:
        traceback.print_exc()
        return 3, (
            f"varshift: internal error ({type(exc).__name__}); this is a bug in varshift "
            f"{__version__}, please report it with the traceback above"
        )
    if rv == 130:
        # typer turns Ctrl-C into exit code 130 (no command of ours returns it); say so.
        # Outputs are written atomically, so nothing partial was left behind.
        return 130, "varshift: interrupted; no output was written"
    return (rv if isinstance(rv, int) else 0), None


def run() -> None:
    """Console-script entry point (``varshift`` and ``python -m varshift``).

    Both put the current directory first on ``sys.path``, as ``python -m`` does, so that
    ``--arch`` and ``--data`` specs like ``mypkg.models:build`` resolve the same
    way whichever way varshift was started.
    """
    cwd = os.getcwd()
    if not any(p in ("", cwd) for p in sys.path):
        sys.path.insert(0, cwd)
    sys.exit(main())
