"""Reports as one self-contained HTML page: inline CSS and SVG, no scripts, nothing fetched.

``to_html(report)`` works for every report type. The page holds the verdict, a per-layer
chart along the network's depth (scan: predicted shift of each BatchNorm; probe: the measured
shift, and running vs eval vs train variance; recalibrate: shift before and after), the
tables, the path from each regularizer to the norms it reaches and, for scan, source
locations. It prints in black and white: every series differs by shape and outline as well as
colour, and every value is also written in a table.

Chart marks carry their numbers: ``<rect class="mark" data-series="shift" data-layer="bn1"
data-value="1.25">`` (values as in the JSON report), so tools and tests can read them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import singledispatch
from html import escape
from typing import AbstractSet, Any, Iterable

from .._version import __version__
from .results import (
    ParityResult,
    ProbeReport,
    RecalibrationReport,
    ScanReport,
    SourceLocation,
    SwapReport,
    plural,
)

CSS = """
:root { --ink: #1b1b1b; --muted: #555; --rule: #bbb; --bad: #b00020; --ok: #1b6e20;
        --warn: #8a5a00; --s1: #4a6fa5; --s2: #e0a040; --s3: #7a7a7a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0; background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; border-bottom: 1px solid var(--rule); padding-bottom: 3px; }
.meta { color: var(--muted); margin: 0 0 14px; }
.verdict { border: 2px solid var(--ink); border-left-width: 10px; padding: 10px 14px; margin: 12px 0; }
.verdict.ok { border-color: var(--ok); }
.verdict.bad { border-color: var(--bad); }
.verdict strong { letter-spacing: .04em; margin-right: .5em; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--rule); padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; white-space: nowrap; }
tr.flag td { font-weight: 600; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.chart { max-width: 100%; height: auto; display: block; margin: 4px 0; }
.chart text { font: 11px system-ui, sans-serif; fill: var(--ink); }
.chart text.halo { paint-order: stroke; stroke: #fff; stroke-width: 3px; }
.chart .axis { stroke: var(--ink); stroke-width: 1; }
.chart .grid { stroke: #ddd; stroke-width: 1; }
.chart .threshold { stroke: var(--bad); stroke-width: 1.5; stroke-dasharray: 6 4; }
.mark.s0 { fill: var(--s1); stroke: var(--ink); stroke-width: .8; }
.mark.s1 { fill: #fff; stroke: var(--ink); stroke-width: 1.2; }
.mark.s2 { fill: var(--s3); stroke: var(--ink); stroke-width: .8; }
.mark.over { fill: var(--bad); }
.legend { color: var(--muted); margin: 2px 0 10px; }
.legend svg { vertical-align: middle; margin: 0 4px 0 10px; }
ul.paths { padding-left: 18px; }
ul.paths li { margin: 3px 0; }
.remarks li { margin: 3px 0; }
footer { color: var(--muted); margin-top: 30px; font-size: 12px; }
@media print {
  main { max-width: none; padding: 0; }
  h2 { break-after: avoid; }
  .chart, table { break-inside: avoid; }
}
"""


# --------------------------------------------------------------------------- charts

#: Shift charts start just below 1x, so that a layer with no shift still shows a stub.
SHIFT_FLOOR = 0.97


@dataclass
class Series:
    """One set of marks: a value per layer (NaN or None: no mark), drawn as ``shape``."""

    name: str
    values: list[float | None]
    shape: str = "bar"  # bar, circle, square, diamond


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == math.inf:
        return "inf"
    return f"{value:.{digits}g}"


def _num(value: float | None) -> str:
    """A mark's data-value: the number as the JSON report has it (6 significant figures)."""
    if value is None or not math.isfinite(value):
        return "nan" if value is None or math.isnan(value) else "inf"
    return repr(float(f"{value:.6g}"))


class _LogScale:
    """Maps values in [lo, hi] to pixels [bottom, top] on a log axis."""

    def __init__(self, lo: float, hi: float, bottom: float, top: float) -> None:
        self.lo, self.hi = math.log10(lo), math.log10(max(hi, lo * 1.0001))
        self.bottom, self.top = bottom, top

    def __call__(self, value: float) -> float:
        v = min(max(math.log10(value), self.lo), self.hi)
        return self.bottom - (v - self.lo) / (self.hi - self.lo) * (self.bottom - self.top)

    def ticks(self) -> list[float]:
        lo, hi = 10 ** self.lo, 10 ** self.hi
        if hi / lo < 20:  # ratios near 1: a few round multiples
            step = _nice((hi - lo) / 4)
            first = math.ceil(lo / step) * step
            return [first + i * step for i in range(6) if first + i * step <= hi * 1.0001]
        return [10.0 ** e for e in range(math.ceil(self.lo), math.floor(self.hi) + 1)]


def _nice(step: float) -> float:
    exp = math.floor(math.log10(step))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10**exp >= step:
            return m * 10**exp
    return 10 ** (exp + 1)  # pragma: no cover


def _shape(shape: str, cx: float, cy: float, r: float, attrs: str) -> str:
    if shape == "circle":
        return f'<circle {attrs} cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}">'
    if shape == "square":
        return f'<rect {attrs} x="{cx - r:.1f}" y="{cy - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}">'
    d = r * 1.3
    pts = f"{cx:.1f},{cy - d:.1f} {cx + d:.1f},{cy:.1f} {cx:.1f},{cy + d:.1f} {cx - d:.1f},{cy:.1f}"
    return f'<polygon {attrs} points="{pts}">'


def chart(
    chart_id: str,
    layers: list[str],
    series: list[Series],
    *,
    y_label: str,
    floor: float | None = None,
    threshold: float | None = None,
    unit: str = "",
) -> str:
    """An SVG chart with one column per layer (in network order) and one mark per layer and
    series; log y axis from ``floor`` (default: the smallest value) to the largest value."""
    values = [v for v in _finite(v for s in series for v in s.values) if v > 0]  # log axis
    if not layers or not values:
        return ""
    n = len(layers)
    longest = max(len(_short(name)) for name in layers)
    left, right, top = 64, 16, 22
    label_h = min(96, 14 + 5 * longest) if n <= 60 else 24
    col = max(6.0, min(110.0, 960.0 / n))
    width = left + right + col * n
    height = top + 230 + label_h
    bottom = top + 230
    lo = floor if floor is not None else min(values) / 1.25
    hi = max(values + ([threshold] if threshold else [])) * 1.12
    scale = _LogScale(lo, hi, bottom, top)
    out = [f'<svg class="chart" id="{chart_id}" role="img" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" '
           f'aria-label="{escape(y_label)} per layer">']
    for t in scale.ticks():
        y = scale(t)
        out.append(f'<line class="grid" x1="{left}" x2="{width - right:.0f}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t, 3)}{unit}</text>')
    out.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}"/>')
    out.append(f'<line class="axis" x1="{left}" x2="{width - right:.0f}" y1="{bottom}" y2="{bottom}"/>')
    out.append(f'<text x="12" y="{(top + bottom) / 2:.0f}" transform="rotate(-90 12 '
               f'{(top + bottom) / 2:.0f})" text-anchor="middle">{escape(y_label)}</text>')
    bars = [s for s in series if s.shape == "bar"]
    bar_w = min(col * 0.8 / max(1, len(bars)), 44.0)
    group_w = bar_w * len(bars)
    for i, layer in enumerate(layers):
        x0 = left + i * col + (col - group_w) / 2
        for k, s in enumerate(series):
            v = s.values[i]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            # off-scale values sit on the axis ends (a zero variance at the bottom)
            drawn = min(max(v, 10 ** scale.lo), 10 ** scale.hi) if math.isfinite(v) else 10 ** scale.hi
            over = threshold is not None and v >= threshold
            cls = f"mark s{k}" + (" over" if over and s.shape == "bar" else "")
            attrs = (f'class="{cls}" data-series="{escape(s.name)}" data-layer="{escape(layer)}" '
                     f'data-value="{_num(v)}"')
            tip = f"<title>{escape(layer)}: {escape(s.name)} {_fmt(v)}{unit}</title>"
            if s.shape == "bar":
                j = bars.index(s)
                y = scale(drawn)
                out.append(f'<rect {attrs} x="{x0 + j * bar_w:.1f}" y="{y:.1f}" '
                           f'width="{max(bar_w - 1, 1):.1f}" height="{bottom - y:.1f}">{tip}</rect>')
            else:
                r = max(2.5, min(5.0, col / 5))
                # side by side within the column, so equal values do not hide each other
                cx = left + i * col + col * (0.25 + 0.5 * k / max(1, len(series) - 1))
                out.append(_shape(s.shape, cx, scale(drawn), r, attrs) + tip
                           + ("</circle>" if s.shape == "circle" else
                              "</rect>" if s.shape == "square" else "</polygon>"))
        if n <= 60:
            cx = left + i * col + col / 2
            out.append(f'<text x="{cx:.1f}" y="{bottom + 10}" text-anchor="end" '
                       f'transform="rotate(-50 {cx:.1f} {bottom + 10})">{escape(_short(layer))}</text>')
    if threshold is not None:
        y = scale(threshold)
        out.append(f'<line class="threshold" x1="{left}" x2="{width - right:.0f}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="halo" x="{left + 4}" y="{y - 4:.1f}">threshold '
                   f'{_fmt(threshold, 3)}{unit}</text>')
    if n > 60:
        out.append(f'<text x="{left}" y="{bottom + 16}">{n} layers in network order, first to '
                   "last (names in the table below)</text>")
    out.append("</svg>")
    return "".join(out)


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _legend(series: list[Series], extra: str = "", over: bool = False) -> str:
    swatches = []
    for k, s in enumerate(series):
        if s.shape == "bar":
            mark = f'<rect class="mark s{k}" x="1" y="1" width="12" height="12"/>'
        else:
            mark = _shape(s.shape, 7, 7, 4.5, f'class="mark s{k}"') + (
                "</circle>" if s.shape == "circle" else "</rect>" if s.shape == "square"
                else "</polygon>")
        swatches.append(f'<svg width="14" height="14" aria-hidden="true">{mark}</svg>{escape(s.name)}')
    if over:
        swatches.append('<svg width="14" height="14" aria-hidden="true"><rect class="mark s0 over" '
                        'x="1" y="1" width="12" height="12"/></svg>at or above the threshold')
    return f'<p class="legend">{"".join(swatches)}{extra}</p>'


# --------------------------------------------------------------------------- page parts


def _page(title: str, meta: str, ok: bool, status: str, verdict: str, body: list[str],
          remarks: Any) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{meta}</p>',
        f'<p class="verdict {"ok" if ok else "bad"}"><strong>{escape(status)}</strong>'
        f"{escape(verdict)}</p>",
        *body,
        _remarks(remarks),
        f"<footer>varshift {escape(__version__)}: self-contained report (no scripts, nothing "
        "loaded from the network).</footer>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _remarks(report: Any) -> str:
    items = [f"<li><strong>warning:</strong> {escape(w)}</li>" for w in getattr(report, "warnings", [])]
    items += [f"<li>note: {escape(n)}</li>" for n in getattr(report, "notes", [])]
    return f'<h2>Warnings and notes</h2><ul class="remarks">{"".join(items)}</ul>' if items else ""


def _table(header: list[str], rows: list[list[str]], numeric: AbstractSet[int] = frozenset(),
           flags: list[bool] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cls = ' class="flag"' if flags and flags[r] else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _meta(report: Any, extra: str = "") -> str:
    bits = [f"model <code>{escape(report.model)}</code>"]
    if getattr(report, "source", None):
        bits.insert(0, f"file <code>{escape(report.source)}</code>")
    if getattr(report, "data", None):
        bits.append(f"data <code>{escape(report.data)}</code>")
    return " · ".join(bits) + (f" · {extra}" if extra else "")


def _loc(loc: SourceLocation | None) -> str:
    if loc is None:
        return "-"
    fn = f" in <code>{escape(loc.function)}</code>" if loc.function else ""
    return f"<code>{escape(loc.file)}:{loc.line}</code>{fn}"


def _paths(pairs: list[tuple[str, list[str], set[str]]]) -> str:
    """(regularizer, norms it reaches in order, the direct ones) as a list of paths."""
    if not pairs:
        return ""
    items = []
    for reg, reached, direct in pairs:
        if not reached:
            continue
        steps = " → ".join(
            f"<code>{escape(n)}</code>" + (" (direct)" if n in direct else "") for n in reached)
        items.append(f"<li><code>{escape(reg)}</code> → {steps}</li>")
    if not items:
        return ""
    return ("<h2>From each regularizer to the BatchNorm layers it reaches</h2>"
            f'<ul class="paths">{"".join(items)}</ul>')


def _prose(text: str) -> str:
    """Escaped text with Markdown-style `code` spans as <code>."""
    parts = escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _sx(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return _fmt(value)
    return f"{value:.3f}x"


# --------------------------------------------------------------------------- per report


@singledispatch
def to_html(report: Any) -> str:
    """``report`` (any varshift report) as a self-contained HTML page."""
    raise TypeError(f"no HTML renderer for {type(report).__name__}")


@to_html.register
def _(report: ScanReport) -> str:
    worst = next((s for s in ("error", "warning", "info") if report.count(s)), None)
    predicted: dict[str, float] = {}
    for f in report.findings:
        if f.predicted_shift is None:
            continue
        reg = report.regularizer(f.regularizer)
        for name in reg.reaches if reg else f.direct:
            predicted[name] = max(predicted.get(name, 1.0), f.predicted_shift)
    names = [n.name for n in report.norms]
    body = []
    if predicted:
        series = [Series("predicted shift", [predicted.get(n, 1.0) for n in names])]
        body += ["<h2>Predicted variance shift along the network</h2>",
                 chart("shift-chart", names, series, y_label="predicted shift", floor=SHIFT_FLOOR,
                       threshold=1.1, unit="x"),
                 _legend(series, over=True, extra=" (the largest zero-mean estimate of the regularizers that "
                         "reach each BatchNorm; 1x: none; <code>varshift probe</code> measures "
                         "them)")]
    if report.findings:
        rows = []
        for f in report.findings:
            reg = report.regularizer(f.regularizer)
            rows.append([
                f"<code>{escape(f.regularizer)}</code> ({escape(reg.type if reg else '')})",
                escape(_fmt(reg.p if reg else None)),
                ", ".join(f"<code>{escape(n)}</code>" for n in f.direct) or "-",
                str(f.downstream_count),
                escape(_sx(f.predicted_shift)),
                escape(f.severity),
                _loc(f.source) + (f"<br>created at {_loc(f.defined_at)}" if f.defined_at else ""),
                _prose(f.remedy),
            ])
        body += ["<h2>Findings</h2>", _table(
            ["regularizer", "p", "direct norms", "downstream", "predicted shift", "severity",
             "source", "remedy"], rows, numeric={1, 3, 4},
            flags=[f.severity == "error" for f in report.findings])]
    body.append(_paths([(r.name, r.reaches, set(
        next((f.direct for f in report.findings if f.regularizer == r.name), [])))
        for r in report.regularizers if r.active]))
    if report.norms:
        rows = [[f"<code>{escape(n.name)}</code>", escape(n.type), "yes" if n.affected else "-",
                 ", ".join(f"<code>{escape(r)}</code>" for r in n.reached_by) or "-",
                 _loc(n.source)] for n in report.norms]
        body += ["<h2>BatchNorm layers</h2>",
                 _table(["layer", "type", "affected", "reached by", "source"], rows)]
    how = "torch.fx" if report.traced_with == "fx" else "a run on an example input"
    return _page("varshift scan", _meta(report, f"traced with {how}"), bool(report),
                 (worst or "ok").upper(), report.verdict, body, report)


@to_html.register
def _(report: ProbeReport) -> str:
    names = [l.name for l in report.layers]
    body = []
    if report.layers:
        shift = [Series("shift (eval vs running)", [l.shift for l in report.layers])]
        body += ["<h2>Variance shift along the network</h2>",
                 chart("shift-chart", names, shift, y_label="shift", floor=SHIFT_FLOOR,
                       threshold=report.threshold, unit="x"),
                 _legend(shift, over=True, extra=f" (<code>max(r, 1/r)</code>, r = eval var / running var; "
                         f"bars at or above {report.threshold:g}x are flagged)")]
        var = [Series("running var", [l.running_var_mean for l in report.layers], "square"),
               Series("eval var", [l.eval_var_mean for l in report.layers], "circle"),
               Series("train var", [l.train_var_mean for l in report.layers], "diamond")]
        body += ["<h2>Running vs eval vs train variance (channel means)</h2>",
                 chart("variance-chart", names, var, y_label="variance"), _legend(var)]
        rows = [[f"<code>{escape(l.name)}</code>",
                 ", ".join(f"<code>{escape(r)}</code>" for r in l.reached_by) or "-",
                 _fmt(l.running_var_mean), _fmt(l.eval_var_mean), _fmt(l.train_var_mean),
                 escape(_sx(l.shift)), escape(_sx(l.train_shift)),
                 f"{escape(_sx(l.channel_shift_median))} / {escape(_sx(l.channel_shift_max))}"]
                for l in report.layers]
        body += ["<h2>Layers</h2>", _table(
            ["layer", "regularizer upstream", "running var", "eval var", "train var", "shift",
             "train/eval", "channels med/max"], rows, numeric={2, 3, 4, 5, 6, 7},
            flags=[l.shift >= report.threshold for l in report.layers])]
        reaches: dict[str, list[str]] = {}
        for l in report.layers:
            for r in l.reached_by:
                reaches.setdefault(r, []).append(l.name)
        body.append(_paths([(r, ns, set()) for r, ns in reaches.items()]))
    facts = f"{report.samples} samples in {plural(report.batches, 'batch', 'batches')}, seed {report.seed}"
    return _page("varshift probe", _meta(report, facts), bool(report),
                 "OK" if report else "SHIFTED", report.verdict, body, report)


def _recal_body(report: RecalibrationReport) -> list[str]:
    names = [l.name for l in report.layers]
    body = []
    if report.layers:
        series = [Series("shift before", [l.shift_before for l in report.layers]),
                  Series("shift after", [l.shift_after for l in report.layers])]
        body += ["<h2>Variance shift before and after, along the network</h2>",
                 chart("shift-chart", names, series, y_label="shift", floor=SHIFT_FLOOR,
                       threshold=report.threshold, unit="x"),
                 _legend(series, " (measured on the calibration data)", over=True)]
    b, a = report.before, report.after
    if b is not None and a is not None:
        where = "held-out" if a.held_out else "calibration (not held out)"
        body += [f"<h2>Metrics on {where} data ({a.samples} samples)</h2>", _table(
            ["metric", "before", "after", "change"],
            [["accuracy", f"{b.accuracy:.2%}", f"{a.accuracy:.2%}",
              f"{(a.accuracy - b.accuracy) * 100:+.2f} points"],
             ["NLL", f"{b.nll:.4f}", f"{a.nll:.4f}", f"{a.nll - b.nll:+.4f}"]],
            numeric={1, 2, 3})]
    if report.layers:
        rows = [[f"<code>{escape(l.name)}</code>", "yes" if l.recalibrated else "-",
                 escape(_sx(l.shift_before)), escape(_sx(l.shift_after)),
                 f"{_fmt(l.running_var_before)} → {_fmt(l.running_var_after)}"]
                for l in report.layers]
        body += ["<h2>Layers</h2>", _table(
            ["layer", "recalibrated", "shift before", "shift after", "running var (mean)"],
            rows, numeric={2, 3, 4})]
    if report.onnx is not None:
        body.append(f"<p>ONNX <code>{escape(report.onnx.output)}</code>: "
                    f"{'parity within tolerance' if report.onnx else 'parity check FAILED'}, max "
                    f"abs diff {_fmt(report.onnx.max_abs_diff, 3)}</p>")
    return body


@to_html.register
def _(report: RecalibrationReport) -> str:
    facts = (f"estimator {escape(report.estimator)}, {plural(report.passes, 'pass', 'passes')} "
             f"over {report.samples} samples")
    if report.output:
        facts += f" · wrote <code>{escape(report.output)}</code>"
    return _page("varshift recalibrate", _meta(report, facts), bool(report),
                 "OK" if report else "CHECK", report.verdict, _recal_body(report), report)


@to_html.register
def _(report: SwapReport) -> str:
    body = []
    if report.entries:
        rows = [[f"<code>{escape(e.name)}</code>", f"{escape(e.type)}(p={_fmt(e.p)})",
                 escape(e.replaced_with or "-"), escape(e.reason or "")] for e in report.entries]
        body += ["<h2>Regularizers that reach a BatchNorm</h2>",
                 _table(["regularizer", "was", "now", "why not swapped"], rows)]
    if report.recalibration is not None:
        body += _recal_body(report.recalibration)
    extra = f"wrote <code>{escape(report.output)}</code>" if report.output else ""
    return _page("varshift swap", _meta(report, extra), bool(report),
                 "OK" if report else "CHECK", report.verdict, body, report)


@to_html.register
def _(report: ParityResult) -> str:
    rows = [[escape(c.label), str(c.batch_size), _fmt(c.max_abs_diff, 3), _fmt(c.max_rel_diff, 3),
             "ok" if c.passed else escape(c.error or "out of tolerance")] for c in report.checks]
    body = ["<h2>onnxruntime against PyTorch (eval mode)</h2>",
            _table(["check", "batch", "max abs diff", "max rel diff", "result"], rows,
                   numeric={1, 2, 3}, flags=[not c.passed for c in report.checks])]
    verdict = (f"{'parity within tolerance' if report.passed else 'parity check failed'}: max abs "
               f"diff {_fmt(report.max_abs_diff, 3)}, max rel diff {_fmt(report.max_rel_diff, 3)} "
               f"(atol {report.atol:g}, rtol {report.rtol:g})")
    return _page("varshift export", _meta(report, f"wrote <code>{escape(report.output)}</code>"),
                 bool(report), "PASSED" if report else "FAILED", verdict, body, report)
