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

from .reports import ScanReport

FORMATS = ("text", "json", "markdown")

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
    """The report in ``fmt`` (text, json, markdown) as a string; text has no control codes."""
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2) + "\n"
    if fmt == "markdown":
        return markdown(report)
    buf = io.StringIO()
    make_console(buf, width=width).print(text(report))
    return buf.getvalue()


def format_for_path(path: str, default: str) -> str:
    """Pick a report file's format from its extension (.json, .md), else ``default``."""
    lower = path.lower()
    if lower.endswith(".json"):
        return "json"
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
        table = Table(title="Regularizers that reach a BatchNorm", title_justify="left")
        for col in ("regularizer", "p", "direct norms", "downstream", "predicted shift",
                    "severity", "remedy"):
            table.add_column(col, overflow="fold")
        for f in report.findings:
            reg = next(r for r in report.regularizers if r.name == f.regularizer)
            table.add_row(
                f"{f.regularizer}\n[{reg.type}]",
                _fmt_p(reg.p),
                "\n".join(f.direct) or "-",
                str(f.downstream_count),
                _fmt_shift(f.predicted_shift) + (" (est.)" if f.predicted_shift else ""),
                Text(f.severity, style=_SEVERITY_STYLE[f.severity]),
                f.remedy,
            )
        parts.append(table)
    quiet = [r for r in report.regularizers if not any(f.regularizer == r.name for f in report.findings)]
    if quiet:
        lines = [f"  {r.name} [{r.type}(p={_fmt_p(r.p)})]: {_why_quiet(r)}" for r in quiet]
        parts.append(Text("Regularizers with no finding:\n" + "\n".join(lines)))
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    parts.append(_verdict_text(bool(report), _worst(report), report.verdict))
    return Group(*parts)


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
            reg = next(r for r in report.regularizers if r.name == f.regularizer)
            rows.append([
                f"`{f.regularizer}` ({reg.type})",
                _fmt_p(reg.p),
                ", ".join(f"`{n}`" for n in f.direct) or "-",
                str(f.downstream_count),
                _fmt_shift(f.predicted_shift),
                f.severity,
                f.remedy,
            ])
        out.append(_md_table(
            ["regularizer", "p", "direct norms", "downstream", "predicted shift", "severity",
             "remedy"], rows))
        out.append("")
    s = report.summary
    out.append(
        f"{s['regularizers']} regularizers ({s['active_regularizers']} active), {s['norms']} "
        f"BatchNorm layers ({s['affected_norms']} affected), traced with "
        f"{_traced(report.traced_with)}. Predicted shifts are the paper's zero-mean estimate; "
        "`varshift probe` measures them."
    )
    for note in report.notes:
        out += ["", f"> note: {note}"]
    return "\n".join(out) + "\n"
