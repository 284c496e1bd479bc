"""Rendering reports: Rich for people, JSON and Markdown for CI. The only place that formats.

``text(report)`` returns a Rich renderable, ``markdown(report)`` a string; both dispatch on the
report type. JSON is ``report.to_dict()``.
"""

from __future__ import annotations

import io
import json
import os
import sys
from functools import singledispatch
from typing import Any, TextIO

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .results import ScanReport, plural

FORMATS = ("text", "json", "markdown", "sarif", "html")

_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def make_console(file: TextIO | None = None, width: int | None = None) -> Console:
    """A console that writes no colour or control codes unless ``file`` is a terminal.

    Rich already honours ``NO_COLOR`` and non-terminals; off a terminal the width is 120 (or
    ``COLUMNS``) rather than Rich's 80, so tables in CI logs and files do not fold.
    """
    file = file if file is not None else sys.stdout
    is_tty = hasattr(file, "isatty") and file.isatty()
    if width is None and not is_tty:
        width = int(os.environ.get("COLUMNS", "0") or 0) or 120
    return Console(
        file=file,
        width=width,
        highlight=False,
        emoji=False,
        no_color=bool(os.environ.get("NO_COLOR")) or None,
        force_terminal=None if is_tty else False,
    )


def render_to_string(report: Any, fmt: str, width: int = 120) -> str:
    """The report in ``fmt`` (text, json, markdown, sarif, html) as a string; text has no
    control codes. ``sarif`` is for scan reports only (VarshiftError otherwise)."""
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2) + "\n"
    if fmt == "sarif":
        from .sarif import to_sarif

        return json.dumps(to_sarif(report), indent=2) + "\n"
    if fmt == "html":
        from .html import to_html

        return to_html(report)
    if fmt == "markdown":
        return markdown(report)
    buf = io.StringIO()
    make_console(buf, width=width).print(text(report))
    # Rich pads justified lines (a table's title) to the full width; files get no trailing blanks.
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


def format_for_path(path: str, default: str) -> str:
    """Pick a report file's format from its extension (.json, .md, .sarif, .html), else
    ``default``."""
    lower = path.lower()
    if lower.endswith((".sarif", ".sarif.json")):
        return "sarif"
    if lower.endswith(".json"):
        return "json"
    if lower.endswith((".html", ".htm")):
        return "html"
    if lower.endswith((".md", ".markdown")):
        return "markdown"
    return default


# --------------------------------------------------------------------------- helpers


def _fmt_shift(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "inf"
    return f"{value:.{digits}f}x"


def _fmt_p(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _fmt_rate(reg: Any) -> str:
    """The regularizer's rate as the column shows it: ``0.5``, or ``beta=0.1`` for Uout
    (whose ``p`` field holds its noise half-width, not a drop probability)."""
    return f"beta={_fmt_p(reg.p)}" if reg.kind == "uout" else _fmt_p(reg.p)


def _call(reg: Any) -> str:
    """``Dropout(p=0.5)``, ``Uout(beta=0.1)``."""
    rate = _fmt_rate(reg)
    return f"{reg.type}({rate if '=' in rate else 'p=' + rate})"


def _verdict_text(ok: bool, worst: str | None, verdict: str) -> Text:
    if ok and worst is None:
        return Text.assemble(("OK ", "bold green"), verdict)
    label = (worst or "ok").upper()
    return Text.assemble((f"{label} ", _SEVERITY_STYLE.get(worst or "", "bold")), verdict)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _remarks_text(report: Any) -> list[Text]:
    """A report's warnings and notes, as lines for the text renderer."""
    out = [Text(f"warning: {w}", style="yellow") for w in getattr(report, "warnings", [])]
    return out + [Text(f"note: {n}", style="dim") for n in report.notes]


def _remarks_md(report: Any) -> list[str]:
    """A report's warnings and notes, as Markdown block quotes (each after a blank line)."""
    out: list[str] = []
    for w in getattr(report, "warnings", []):
        out += ["", f"> **warning:** {w}"]
    for n in report.notes:
        out += ["", f"> note: {n}"]
    return out


def _status(passed: bool, ok: str, bad: str, verdict: str) -> Text:
    """The last line: a coloured status word, then the verdict."""
    return Text.assemble((f"{ok} ", "bold green") if passed else (f"{bad} ", "bold red"), verdict)


@singledispatch
def text(report: Any):
    """A Rich renderable for ``report``."""
    raise TypeError(f"no text renderer for {type(report).__name__}")


@singledispatch
def markdown(report: Any) -> str:
    """A Markdown document for ``report`` (a pull-request comment)."""
    raise TypeError(f"no markdown renderer for {type(report).__name__}")


# --------------------------------------------------------------------------- scan


def _worst(report: ScanReport) -> str | None:
    for sev in ("error", "warning", "info"):
        if report.count(sev):
            return sev
    return None


def _title(command: str, report: Any) -> str:
    source = f"{report.source} " if getattr(report, "source", None) else ""
    return f"varshift {command}: {source}({report.model})"


@text.register
def _(report: ScanReport):
    parts: list[Any] = [
        Text(f"{_title('scan', report)}, traced with {_traced(report.traced_with)}", style="bold")
    ]
    if report.findings:
        table = Table(title="Findings", title_justify="left")
        for col in ("regularizer", "p", "direct norms", "norms reached", "predicted shift",
                    "severity", "remedy"):
            table.add_column(col, overflow="fold")
        for f in report.findings:
            reg = _finding_subject(report, f)
            table.add_row(
                f"{f.regularizer}\n[{reg.type}]",
                _fmt_rate(reg),
                "\n".join(f.direct) or "-",
                str(f.downstream_count),
                _fmt_shift(f.predicted_shift) + (" (est.)" if f.predicted_shift else ""),
                Text(f.severity, style=_SEVERITY_STYLE[f.severity]),
                f.remedy,
            )
        parts.append(table)
    where = _where(report)
    if where:
        parts.append(Text("Where (the line that calls it; created at):\n" + "\n".join(
            f"    -> {name}: {loc}" if is_norm else f"  {name}: {loc}"
            for is_norm, name, loc in where)))
    quiet = [r for r in report.regularizers if not any(f.regularizer == r.name for f in report.findings)]
    if quiet:
        lines = [f"  {r.name} [{_call(r)}]: {_why_quiet(r)}" for r in quiet]
        parts.append(Text("Regularizers with no finding:\n" + "\n".join(lines)))
    parts += _remarks_text(report)
    parts.append(_verdict_text(bool(report), _worst(report), report.verdict))
    return Group(*parts)


def _loc_text(source, defined_at, code: str = "") -> str | None:
    """``file:line in fn (created at file:line)``, or None when neither is known."""
    parts = []
    if source is not None:
        parts.append(f"{code}{source.file}:{source.line}{code}"
                     + (f" in {code}{source.function}{code}" if source.function else ""))
    if defined_at is not None:
        parts.append(f"(created at {code}{defined_at.file}:{defined_at.line}{code})")
    return " ".join(parts) or None


def _where(report: ScanReport, code: str = "") -> list[tuple[bool, str, str]]:
    """(is a norm, name, location) for each finding's regularizer and then its direct norms,
    for those whose location is known; ``code`` wraps paths (Markdown backticks)."""
    out: list[tuple[bool, str, str]] = []
    for f in report.findings:
        loc = _loc_text(f.source, f.defined_at, code)
        if loc:
            out.append((False, f.regularizer, loc))
        for name in f.direct:
            norm = report.norm(name)
            nloc = norm and _loc_text(norm.source, norm.defined_at, code)
            if nloc:
                out.append((True, name, nloc))
    return out
def _finding_subject(report: ScanReport, f) -> Any:
    """The regularizer a finding is about; for a finding about a norm (no regularizer), a
    stand-in that names the rule."""
    from types import SimpleNamespace

    reg = next((r for r in report.regularizers if r.name == f.regularizer), None)
    return reg if reg is not None else SimpleNamespace(type=f.rule, p=None, kind=None)


def _traced(how: str) -> str:
    return "torch.fx" if how == "fx" else "a run on an example input"


def _why_quiet(reg) -> str:
    if not reg.active:
        return "inactive (p = 0 or training=False)"
    if not reg.reaches:
        return "reaches no BatchNorm"
    return "no finding"


@markdown.register
def _(report: ScanReport) -> str:
    out = [f"### {_title('scan', report)}", "", f"**Verdict ({(_worst(report) or 'ok')}):** "
           f"{report.verdict}", ""]
    if report.findings:
        rows = []
        for f in report.findings:
            reg = _finding_subject(report, f)
            rows.append([
                f"`{f.regularizer}` ({reg.type})",
                _fmt_rate(reg),
                ", ".join(f"`{n}`" for n in f.direct) or "-",
                str(f.downstream_count),
                _fmt_shift(f.predicted_shift),
                f.severity,
                f.remedy,
            ])
        out.append(_md_table(
            ["regularizer", "p", "direct norms", "norms reached", "predicted shift", "severity",
             "remedy"], rows))
        out.append("")
        where = _where(report, code="`")
        if where:
            out += ["Where (the line that calls it; created at):", ""]
            out += [f"  - feeds `{name}`: {loc}" if is_norm else f"- `{name}`: {loc}"
                    for is_norm, name, loc in where]
            out.append("")
    s = report.summary
    out.append(
        f"{plural(s['regularizers'], 'regularizer')} ({s['active_regularizers']} active), "
        f"{plural(s['norms'], 'BatchNorm layer')} ({s['affected_norms']} affected), traced with "
        f"{_traced(report.traced_with)}. Predicted shifts are the paper's zero-mean estimate; "
        "`varshift probe` measures them."
    )
    out += _remarks_md(report)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- export

from .results import ParityResult  # noqa: E402  (appended section; see the top for the rest)


def _fmt_diff(value: float) -> str:
    return "-" if value == float("inf") else f"{value:.2e}"


def _fmt_size(size: float) -> str:
    for unit in ("B", "kB", "MB"):
        if size < 1000 or unit == "MB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


def _export_facts(report: ParityResult) -> str:
    exporter = f"{report.exporter} exporter, " if report.exporter else ""
    outputs = f"{report.outputs} output{'s' if report.outputs != 1 else ''}"
    return (f"{exporter}opset {report.opset if report.opset is not None else '?'}, {outputs}, "
            f"{_fmt_size(report.file_size)}; tolerance atol={report.atol:g}, "
            f"rtol={report.rtol:g}")


def _export_verdict(report: ParityResult) -> str:
    sizes = ", ".join(str(b) for b in report.batch_sizes)
    word = "parity within tolerance" if report.passed else "parity check failed"
    return (f"{word} at batch sizes {sizes}: max abs diff {_fmt_diff(report.max_abs_diff)}, "
            f"max rel diff {_fmt_diff(report.max_rel_diff)}")


@text.register
def _(report: ParityResult):
    parts: list[Any] = [Text(f"{_title('export', report)} -> {report.output}", style="bold")]
    table = Table(title="onnxruntime against PyTorch (eval mode)", title_justify="left")
    for col in ("check", "batch", "max abs diff", "max rel diff", "result"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        result = Text("ok", style="green") if c.passed else Text(
            c.error or "out of tolerance", style="bold red")
        table.add_row(c.label, str(c.batch_size), _fmt_diff(c.max_abs_diff),
                      _fmt_diff(c.max_rel_diff), result)
    parts.append(table)
    parts.append(Text(_export_facts(report)))
    parts += _remarks_text(report)
    parts.append(_status(report.passed, "PASSED", "FAILED", _export_verdict(report)))
    return Group(*parts)


@markdown.register
def _(report: ParityResult) -> str:
    status = "ok" if report.passed else "failed"
    out = [f"### {_title('export', report)} -> `{report.output}`", "",
           f"**Verdict ({status}):** {_export_verdict(report)}", ""]
    rows = [[c.label, str(c.batch_size), _fmt_diff(c.max_abs_diff), _fmt_diff(c.max_rel_diff),
             "ok" if c.passed else (c.error or "out of tolerance")] for c in report.checks]
    out.append(_md_table(["check", "batch", "max abs diff", "max rel diff", "result"], rows))
    out += ["", _export_facts(report) + "."]
    out += _remarks_md(report)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- probe


def _shift_bar(shift: float, scale: float, threshold: float, width: int = 16):
    """A bar for ``shift`` on a log scale from 1x to ``scale``."""
    import math

    from rich.bar import Bar

    if not math.isfinite(shift):
        shift = scale
    end = math.log(max(shift, 1.0)) / math.log(scale) * width if scale > 1 else 0.0
    color = "red" if shift >= threshold else ("yellow" if shift >= 1 + (threshold - 1) / 2 else "green")
    return Bar(size=width, begin=0, end=end, width=width, color=color)


def _fmt_var(value: float) -> str:
    return "-" if value != value else f"{value:.4g}"


def _probe_layer_cells(layer) -> list[str]:
    return [
        _fmt_var(layer.running_var_mean),
        _fmt_var(layer.eval_var_mean),
        _fmt_var(layer.train_var_mean),
        _fmt_shift(layer.shift, 3),
        _fmt_shift(layer.train_shift, 3),
        f"{_fmt_shift(layer.channel_shift_median)} / {_fmt_shift(layer.channel_shift_max)}",
    ]


def _affected_cell(layer) -> str:
    if layer.affected is None:
        return "?"
    if not layer.affected:
        return "-"
    shown = ", ".join(layer.reached_by[:2])
    return shown + (f" +{len(layer.reached_by) - 2}" if len(layer.reached_by) > 2 else "")


def _probe_facts(report) -> str:
    s = report.summary
    return (
        f"{report.samples} samples in {report.batches} batches (seed {report.seed}); "
        f"{s['layers']} BatchNorm layers, {s['affected_layers']} reached by a regularizer; "
        f"{s['layers_above_threshold']} at or above {report.threshold:g}x"
    )


from .results import ProbeReport  # noqa: E402, I001  (grouped with its renderers)

#: Probe columns (header, numeric: never wrapped), and the order in which they are left out
#: when the console is too narrow to show every number on one line.
_PROBE_COLUMNS = [("layer", False), ("regularizer upstream", False), ("running var", True),
                  ("eval var", True), ("train var", True), ("shift", True), ("train/eval", True),
                  ("channels med/max", True), ("", True)]
_PROBE_DROP_ORDER = ["", "channels med/max", "train var", "running var", "eval var",
                     "regularizer upstream"]
_TEXT_WIDTH = 16  # layer and regularizer names fold beyond this
_BAR_WIDTH = 16


class _ProbeTable:
    """The probe table, with as many columns as fit the console's width.

    Numbers are never wrapped (a folded ``0.043|58`` reads as two numbers): when the table
    does not fit, whole columns are left out, least important first, and a line says which.
    """

    def __init__(self, report: ProbeReport) -> None:
        self.report = report
        worst = report.worst.shift if report.worst else 1.0
        self.scale = max(2.0, worst if worst == worst and worst != float("inf") else 2.0)

    def _widths(self, split: bool) -> dict[str, int]:
        """The width each column needs: numbers whole, text at most _TEXT_WIDTH (it folds);
        ``split``: headers on two lines."""
        rows = [[layer.name, _affected_cell(layer), *_probe_layer_cells(layer)]
                for layer in self.report.layers]
        widths = {}
        for i, (header, numeric) in enumerate(_PROBE_COLUMNS[:-1]):
            cells = [len(row[i]) for row in rows]
            head = max(len(line) for line in _header(header, split).splitlines())
            if numeric:
                widths[header] = max(cells + [head])
            else:
                widths[header] = min(max(cells + [head]), _TEXT_WIDTH)
        widths[""] = _BAR_WIDTH
        return widths

    def _table(self, hidden: set[str], widths: dict[str, int], split: bool) -> Table:
        report = self.report
        title = "Variance shift per BatchNorm (eval vs running"
        title += ")" if "" in hidden else f"; bar: log scale 1x-{self.scale:.3g}x)"
        table = Table(title=title, title_justify="left")
        shown = [(h, numeric) for h, numeric in _PROBE_COLUMNS if h not in hidden]
        for header, numeric in shown:
            table.add_column(_header(header, split), no_wrap=numeric, overflow="fold",
                             min_width=widths[header])
        for layer in report.layers:
            style = "bold" if layer.shift >= report.threshold else ""
            cells: dict[str, Any] = dict(zip(
                [h for h, _ in _PROBE_COLUMNS],
                [Text(layer.name, style=style), _affected_cell(layer), *_probe_layer_cells(layer),
                 _shift_bar(layer.shift, self.scale, report.threshold, _BAR_WIDTH)],
            ))
            table.add_row(*(cells[h] for h, _ in shown))
        return table

    def __rich_console__(self, console: Console, options: Any):
        hidden: set[str] = set()

        def needed(widths: dict[str, int]) -> int:  # cells, one space each side, the rules
            return sum(w + 3 for h, w in widths.items() if h not in hidden) + 1

        split = needed(self._widths(False)) > options.max_width
        widths = self._widths(split)
        for column in _PROBE_DROP_ORDER:
            if needed(widths) <= options.max_width:
                break
            hidden.add(column)
        yield self._table(hidden, widths, split)
        named = [h for h in _PROBE_DROP_ORDER if h in hidden and h]
        if named:
            yield Text(f"({', '.join(named)} left out at this width; the JSON report or a "
                       "wider terminal shows them)")


def _header(header: str, split: bool) -> str:
    """``"running var"`` -> ``"running\\nvar"`` when ``split`` (numeric columns never wrap)."""
    return header.replace(" ", "\n", 1) if split else header


@text.register
def _(report: ProbeReport):
    parts: list[Any] = [Text(_title("probe", report) + (f" on {report.data}" if report.data else ""),
                             style="bold")]
    if report.layers:
        parts.append(_ProbeTable(report))
    parts.append(Text(_probe_facts(report)))
    parts += _remarks_text(report)
    parts.append(_status(bool(report), "OK", "SHIFTED", report.verdict))
    return Group(*parts)


@markdown.register
def _(report: ProbeReport) -> str:
    status = "ok" if report else "shifted"
    out = [f"### {_title('probe', report)}", "", f"**Verdict ({status}):** {report.verdict}", ""]
    if report.layers:
        rows = [[f"`{l.name}`", _affected_cell(l), *_probe_layer_cells(l)] for l in report.layers]
        out.append(_md_table(["layer", "regularizer upstream", "running var", "eval var",
                              "train var", "shift", "train/eval", "channels med/max"], rows))
        out.append("")
    out.append(_probe_facts(report) + ".")
    out += _remarks_md(report)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- recalibrate


from .results import RecalibrationReport, SwapReport  # noqa: E402


def _metrics_line(report: RecalibrationReport) -> str | None:
    b, a = report.before, report.after
    if b is None or a is None:
        return None
    where = "held-out" if a.held_out else "calibration (not held out)"
    return (
        f"{where} data, {a.samples} samples: accuracy {b.accuracy:.2%} -> {a.accuracy:.2%}, "
        f"NLL {b.nll:.4f} -> {a.nll:.4f}"
    )


def _recal_rows(report: RecalibrationReport) -> list[list[str]]:
    return [
        [
            l.name,
            "yes" if l.recalibrated else "-",
            _fmt_shift(l.shift_before, 3),
            _fmt_shift(l.shift_after, 3),
            f"{l.running_var_before:.4g} -> {l.running_var_after:.4g}",
        ]
        for l in report.layers
    ]


_RECAL_COLUMNS = ["layer", "recalibrated", "shift before", "shift after", "running var (mean)"]


def _recal_facts(report: RecalibrationReport) -> str:
    if report.passes == 0:  # nothing to recalibrate: the estimator never ran
        text = f"estimator {report.estimator}: not run ({report.samples} calibration samples measured)"
    else:
        text = (
            f"estimator {report.estimator}: {plural(report.passes, 'pass', 'passes')} over "
            f"{plural(report.batches, 'batch', 'batches')} ({report.samples} samples)"
        )
    if report.output:
        text += f"; wrote {report.output}"
    return text


@text.register
def _(report: RecalibrationReport):
    parts: list[Any] = [Text(_title("recalibrate", report) + (f" on {report.data}" if report.data else ""),
                             style="bold")]
    if report.layers:
        table = Table(title="BatchNorm statistics before and after (shifts on the calibration data)",
                      title_justify="left")
        for col in _RECAL_COLUMNS:
            table.add_column(col, overflow="fold")
        for row in _recal_rows(report):
            table.add_row(*row)
        parts.append(table)
    parts.append(Text(_recal_facts(report)))
    line = _metrics_line(report)
    if line:
        parts.append(Text(line))
    if report.onnx is not None:
        parts.append(Text(f"ONNX: {_export_verdict(report.onnx)}"))
    parts += _remarks_text(report)
    parts.append(_status(bool(report), "OK", "CHECK", report.verdict))
    return Group(*parts)


@markdown.register
def _(report: RecalibrationReport) -> str:
    out = [f"### {_title('recalibrate', report)}", "",
           f"**Verdict ({'ok' if report else 'check'}):** {report.verdict}", ""]
    if report.layers:
        out += [_md_table(_RECAL_COLUMNS, _recal_rows(report)), ""]
    out.append(_recal_facts(report) + ".")
    line = _metrics_line(report)
    if line:
        out += ["", line + "."]
    if report.onnx is not None:
        out += ["", f"ONNX: {_export_verdict(report.onnx)}."]
    out += _remarks_md(report)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- swap


def _swap_rows(report: SwapReport) -> list[list[str]]:
    return [
        [e.name, _call(e), e.replaced_with or "-", e.reason or ""]
        for e in report.entries
    ]


_SWAP_COLUMNS = ["regularizer", "was", "now", "why not swapped"]


@text.register
def _(report: SwapReport):
    parts: list[Any] = [Text(_title("swap", report), style="bold")]
    if report.entries:
        table = Table(title="Regularizers that reach a BatchNorm", title_justify="left")
        for col in _SWAP_COLUMNS:
            table.add_column(col, overflow="fold")
        for row in _swap_rows(report):
            table.add_row(*row)
        parts.append(table)
    if report.output:
        parts.append(Text(f"wrote {report.output}"
                          + (" (a torch.fx GraphModule)" if report.graph_module else "")))
    if report.recalibration is not None:
        line = _metrics_line(report.recalibration)
        if line:
            parts.append(Text(line))
    if report.onnx is not None:
        parts.append(Text(f"ONNX: {_export_verdict(report.onnx)}"))
    parts += _remarks_text(report)
    parts.append(_status(bool(report), "OK", "CHECK", report.verdict))
    return Group(*parts)


@markdown.register
def _(report: SwapReport) -> str:
    out = [f"### {_title('swap', report)}", "",
           f"**Verdict ({'ok' if report else 'check'}):** {report.verdict}", ""]
    if report.entries:
        out += [_md_table(_SWAP_COLUMNS, _swap_rows(report)), ""]
    if report.output:
        out.append(f"Wrote `{report.output}`" + (" (a torch.fx GraphModule)." if report.graph_module else "."))
    if report.recalibration is not None:
        line = _metrics_line(report.recalibration)
        if line:
            out += ["", line + "."]
    if report.onnx is not None:
        out += ["", f"ONNX: {_export_verdict(report.onnx)}."]
    out += _remarks_md(report)
    return "\n".join(out) + "\n"
