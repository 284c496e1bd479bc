"""varshift benchmarks: speed, memory and precision against what users would pick instead.

    python bench/run.py            # full run (~6.5 min on 2 shared cores, one thread)
    python bench/run.py --quick    # ~1.8 min, fewer repetitions
    python bench/run.py --only probe,precision --reps 3

Prints a table and writes bench/results.json. Every ratio is measured side by side in one
run: the cases of a group are interleaved (``for r in range(R): A; B; C``, order rotated each
repetition, one untimed warm-up round) and the ratio is the ratio of the medians. Peak memory
is measured in separate subprocesses (``--child``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # measure this checkout's varshift, not an installed one

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.optim.swa_utils import update_bn  # noqa: E402

import bench_models as bm  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
try:
    from fvcore.nn.precise_bn import update_bn_stats as fvcore_update_bn_stats
except Exception:  # fvcore is optional (not in the Makefile's .venv-arch)
    fvcore_update_bn_stats = None

import varshift  # noqa: E402

TARGETS = {
    "probe": 1.3,
    "probe_memory": 1.05,
    "recal_population": 1.1,
    "recal_memory": 1.05,
    "vs_fvcore_speed": 1.1,
    "exact_vs_population": 1.5,
}


# --------------------------------------------------------------------------- timing


def interleaved(cases: list[tuple[str, Callable[[], Any] | None, Callable[..., Any]]],
                reps: int, warmup: int = 1) -> dict[str, dict]:
    """Time ``cases`` side by side: each repetition runs every case once, in an order rotated
    by one each repetition. ``setup`` (untimed) returns the argument of ``fn``."""
    samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for r in range(warmup + reps):
        k = r % len(cases)
        for name, setup, fn in cases[k:] + cases[:k]:
            arg = setup() if setup is not None else None
            gc.collect()
            t0 = time.perf_counter()
            fn(arg) if setup is not None else fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                samples[name].append(dt)
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "samples_s": s}
        for name, s in samples.items()
    }


def med(t: dict, name: str) -> float:
    return t[name]["median_s"]


def eval_pass(model: nn.Module, batches) -> None:
    with torch.no_grad():
        model.eval()
        for b in batches:
            model(b[0] if isinstance(b, (tuple, list)) else b)


def deepcopy_of(model: nn.Module) -> Callable[[], nn.Module]:
    return lambda: copy.deepcopy(model)


def fvcore_modes(model: nn.Module) -> nn.Module:
    """fvcore leaves modes to the caller: dropout off (eval), BNs in train mode."""
    model.eval()
    for m in bm.bn_modules(model):
        m.train()
    return model


def run_fvcore(model: nn.Module, batches) -> None:
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    fvcore_update_bn_stats(fvcore_modes(model), xs, num_iters=len(xs))


def load_note() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- 1. probe


def bench_probe(cfg) -> dict:
    out: dict[str, Any] = {}
    models = []
    try:
        model, batches = bm.densenet(cfg.size, cfg.batch, cfg.batches)
        models.append((f"densenet121 {cfg.batch}x3x{cfg.size}x{cfg.size} x{cfg.batches}",
                       model, batches))
    except ImportError as exc:
        out["densenet_skipped"] = f"torchvision missing: {exc}"
    for name, build in (("digits_dropout_bn.pt 64x1x8x8 x8", bm.digits_sequential),
                        ("digits_functional_ckpt.pt 64x1x8x8 x8", bm.digits_functional)):
        model, batches = build()
        models.append((name, model, batches))
    for name, model, batches in models:
        small = "digits" in name
        reps = cfg.reps * (4 if small else 1)
        load0 = load_note()
        t = interleaved([
            ("eval_pass", None, lambda: eval_pass(model, batches)),
            ("update_bn", deepcopy_of(model), lambda c: update_bn(batches, c)),
            ("probe", None, lambda: varshift.probe(model, batches)),
        ], reps)
        base = med(t, "eval_pass") + med(t, "update_bn")
        out[name] = {
            "times": t,
            "ratio": med(t, "probe") / base,
            "load_before_after": [load0, load_note()],
            "reps": reps,
        }
    # Fixed cost (fx scan) against the per-batch work: DenseNet with 4x the batches.
    if cfg.scaling and models and models[0][0].startswith("densenet"):
        model = models[0][1]
        more = bm.random_batches(cfg.batches * 4, (cfg.batch, 3, cfg.size, cfg.size), 99)
        t4 = interleaved([
            ("eval_pass", None, lambda: eval_pass(model, more)),
            ("update_bn", deepcopy_of(model), lambda c: update_bn(more, c)),
            ("probe", None, lambda: varshift.probe(model, more)),
        ], max(2, cfg.reps // 2))
        out["densenet_x4_batches"] = {
            "batches": len(more),
            "times": t4,
            "ratio": med(t4, "probe") / (med(t4, "eval_pass") + med(t4, "update_bn")),
        }
    return out


# --------------------------------------------------------------------------- 3+6. recalibrate population


def bench_recal_population(cfg) -> dict:
    out: dict[str, Any] = {}
    try:
        model, batches = bm.densenet(cfg.size, cfg.batch, cfg.batches)
    except ImportError as exc:
        return {"skipped": f"torchvision missing: {exc}"}

    def recal(m, **kw):
        return varshift.recalibrate(m, batches, exact=False, **kw)

    cases = [
        ("update_bn", deepcopy_of(model), lambda c: update_bn(batches, c)),
        ("recal_measure_false", None, lambda: recal(model, measure=False)),
        ("recal_measure_false_inplace", deepcopy_of(model),
         lambda c: recal(c, measure=False, inplace=True)),
        ("recal_default_measure_true", None, lambda: recal(model)),
    ]
    if fvcore_update_bn_stats is not None:
        cases.append(("fvcore_update_bn_stats", deepcopy_of(model),
                      lambda c: run_fvcore(c, batches)))
    else:
        out["fvcore_skipped"] = "fvcore is not installed (pip install fvcore)"
    load0 = load_note()
    t = interleaved(cases, cfg.reps)
    out["times"] = t
    out["load_before_after"] = [load0, load_note()]
    out["ratio_vs_update_bn"] = med(t, "recal_measure_false") / med(t, "update_bn")
    out["ratio_inplace_vs_update_bn"] = (
        med(t, "recal_measure_false_inplace") / med(t, "update_bn"))
    out["ratio_default_measure_true_vs_update_bn"] = (
        med(t, "recal_default_measure_true") / med(t, "update_bn"))
    if fvcore_update_bn_stats is not None:
        out["ratio_inplace_vs_fvcore"] = (
            med(t, "recal_measure_false_inplace") / med(t, "fvcore_update_bn_stats"))
        out["ratio_vs_fvcore"] = med(t, "recal_measure_false") / med(t, "fvcore_update_bn_stats")
    # Fixed cost (fx scan) against the per-batch work: the same ratio with 4x the batches.
    if cfg.scaling:
        more = bm.random_batches(cfg.batches * 4, (cfg.batch, 3, cfg.size, cfg.size), 99)
        cases4 = [
            ("update_bn", deepcopy_of(model), lambda c: update_bn(more, c)),
            ("recal_measure_false", None,
             lambda: varshift.recalibrate(model, more, measure=False)),
        ]
        if fvcore_update_bn_stats is not None:
            cases4 += [
                ("recal_measure_false_inplace", deepcopy_of(model),
                 lambda c: varshift.recalibrate(c, more, measure=False, inplace=True)),
                ("fvcore_update_bn_stats", deepcopy_of(model), lambda c: run_fvcore(c, more)),
            ]
        t4 = interleaved(cases4, max(2, cfg.reps // 2))
        out["x4_batches"] = {
            "batches": len(more),
            "times": t4,
            "ratio_vs_update_bn": med(t4, "recal_measure_false") / med(t4, "update_bn"),
        }
        if fvcore_update_bn_stats is not None:
            out["x4_batches"]["ratio_inplace_vs_fvcore"] = (
                med(t4, "recal_measure_false_inplace") / med(t4, "fvcore_update_bn_stats"))
    from varshift.rules import scan

    ex = batches[0][:1]
    ts = interleaved([("scan", None, lambda: scan(model, ex))], cfg.reps)
    out["scan_s"] = med(ts, "scan")
    return out


# --------------------------------------------------------------------------- 4. exact


def fx_dependency_levels(model: nn.Module) -> dict:
    """Independent count of the exact estimator's dependency levels, from a plain torch.fx
    trace (train mode): affected BN = reachable from an active dropout; a BN's level is
    1 + the deepest affected BN upstream of it."""
    import torch.fx
    import torch.nn.functional as F

    drop_fns = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                F.feature_alpha_dropout, torch.dropout}
    was = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        graph = torch.fx.Tracer().trace(model)
    finally:
        for m, tr in was:
            m.training = tr
    modules = dict(model.named_modules())

    def is_drop(n):
        if n.op == "call_function" and n.target in drop_fns:
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
            return n.kwargs.get("training", True) and p > 0
        if n.op == "call_module":
            m = modules[n.target]
            return isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
        return False

    def is_bn(n):
        return n.op == "call_module" and isinstance(modules[n.target], bm.BN_TYPES)

    reached: set = set()
    for n in graph.nodes:  # topological order
        if is_drop(n) or any(i in reached for i in n.all_input_nodes):
            reached.add(n)
    level: dict = {}
    up: dict = {}
    for n in graph.nodes:
        u = max((level.get(i, up.get(i, -1)) for i in n.all_input_nodes), default=-1)
        if is_bn(n) and n in reached and not is_drop(n):
            level[n] = u + 1
        up[n] = u
    bns = [n for n in graph.nodes if is_bn(n)]
    return {
        "norms": len(bns),
        "affected": len(level),
        "levels": 1 + max(level.values(), default=-1),
    }


def count_macs(fn) -> float:
    """Multiply-accumulates of every Conv/Linear call while ``fn`` runs."""
    total = [0.0]

    def hook(module, args, output):
        if isinstance(module, nn.modules.conv._ConvNd):
            k = 1
            for s in module.kernel_size:
                k *= s
            total[0] += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    h = nn.modules.module.register_module_forward_hook(hook)
    try:
        fn()
    finally:
        h.remove()
    return total[0]


def _exact_report(model, batches, **kw):
    return varshift.recalibrate(model, batches, exact=True, measure=False, **kw)[1]


def bench_exact(cfg) -> dict:
    """DenseNet-121: the exact estimator (frontier) side by side with the population
    estimator, update_bn and one eval pass; the per-level path once in the same run (full
    mode); EfficientNet-B0 and the digits samples: exact / population."""
    try:
        model, batches = bm.densenet(cfg.size, cfg.batch, cfg.batches)
    except ImportError as exc:
        return {"skipped": f"torchvision missing: {exc}"}
    out: dict[str, Any] = {"batches": len(batches)}
    out.update(fx_dependency_levels(model))
    # Work done, in full-forward equivalents (conv/linear MACs), on one batch.
    one = batches[:1]
    full = count_macs(lambda: eval_pass(model, one))
    reports = []
    exact = count_macs(lambda: reports.append(_exact_report(model, one)))
    rep = reports[0]
    out["passes"] = rep.passes
    out["path"] = rep.exact.path
    out["cuts"] = rep.exact.cuts
    out["mac_forward_equivalents"] = exact / full
    load0 = load_note()
    t = interleaved([
        ("eval_pass", None, lambda: eval_pass(model, batches)),
        ("update_bn", deepcopy_of(model), lambda c: update_bn(batches, c)),
        ("recal_population", None,
         lambda: varshift.recalibrate(model, batches, exact=False, measure=False)),
        ("recal_exact", None, lambda: reports.append(_exact_report(model, batches))),
    ], cfg.exact_reps)
    out["times"] = t
    out["load_before_after"] = [load0, load_note()]
    out["exact_info"] = dataclasses.asdict(reports[-1].exact)
    out["ratio_exact_vs_population"] = med(t, "recal_exact") / med(t, "recal_population")
    out["ratio_exact_vs_update_bn"] = med(t, "recal_exact") / med(t, "update_bn")
    out["time_eval_pass_equivalents"] = med(t, "recal_exact") / med(t, "eval_pass")
    if cfg.exact_levels:
        # The per-level path (what --exact cost before the frontier), once, right after.
        t0 = time.perf_counter()
        rep = _exact_report(model, batches, exact_path="levels")
        levels_s = time.perf_counter() - t0
        out["per_level_path"] = {
            "passes": rep.passes,
            "time_s": levels_s,
            "time_eval_pass_equivalents": levels_s / med(t, "eval_pass"),
            "ratio_vs_population": levels_s / med(t, "recal_population"),
            "mac_forward_equivalents": count_macs(
                lambda: _exact_report(model, one, exact_path="levels")) / full,
        }
    others = []
    try:
        import torchvision

        torch.manual_seed(0)
        eff = torchvision.models.efficientnet_b0(weights=None)
        eff_batches = bm.random_batches(cfg.batches, (cfg.batch, 3, cfg.size, cfg.size), 5)
        bm.give_bn_stats(eff, eff_batches)
        others.append((f"efficientnet_b0 {cfg.batch}x3x{cfg.size}x{cfg.size} x{cfg.batches}",
                       eff, eff_batches, 1))
    except ImportError:
        pass
    for name, build in (("digits_dropout_bn.pt 64x1x8x8 x8", bm.digits_sequential),
                        ("digits_functional_ckpt.pt 64x1x8x8 x8", bm.digits_functional)):
        m, b = build()
        others.append((name, m, b, 4))
    out["others"] = {}
    for name, m, b, scale in others:
        reports = []
        t = interleaved([
            ("eval_pass", None, lambda: eval_pass(m, b)),
            ("recal_population", None,
             lambda: varshift.recalibrate(m, b, exact=False, measure=False)),
            ("recal_exact", None, lambda: reports.append(_exact_report(m, b))),
        ], cfg.exact_reps * scale)
        out["others"][name] = {
            "times": t,
            "exact_info": dataclasses.asdict(reports[-1].exact),
            "passes": reports[-1].passes,
            "ratio_exact_vs_population": med(t, "recal_exact") / med(t, "recal_population"),
            "time_eval_pass_equivalents": med(t, "recal_exact") / med(t, "eval_pass"),
        }
    return out


# --------------------------------------------------------------------------- 2+5. memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child(what: str, n: int, threads: int, cache_mb: float | None = None) -> None:
    """Run one call on ``n`` on-the-fly batches and print its peak RSS as JSON."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = bm.MemNet()
    bm.give_bn_stats(model, list(bm.one_shot_batches(3, seed=123)))
    model.eval()
    gc.collect()
    try:  # reset the peak (VmHWM and ru_maxrss) so that it covers the call only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status_kb("VmRSS")
    extra: dict = {}
    if what == "probe":
        varshift.probe(model, bm.one_shot_batches(n))
    elif what == "recal_population":
        varshift.recalibrate(model, bm.OnTheFly(n))
    elif what == "recal_population_generator":  # a one-shot generator: materialized by design
        varshift.recalibrate(model, bm.one_shot_batches(n), measure=False)
    elif what == "update_bn":
        update_bn(bm.OnTheFly(n), copy.deepcopy(model))
    elif what == "recal_exact":
        rep = varshift.recalibrate(model, bm.OnTheFly(n), exact=True, measure=False,
                                   cache_mb=cache_mb)[1]
        extra = dataclasses.asdict(rep.exact)
    else:
        raise SystemExit(f"unknown child {what}")
    hwm = _status_kb("VmHWM")
    print(json.dumps({
        "what": what,
        "batches": n,
        "rss_before_kb": before,
        # The call's peak: VmHWM (the kernel's high-water RSS of this process, what
        # ru_maxrss reports for it) after the reset above. ru_maxrss itself is also kept, but
        # it cannot be reset below the RSS the parent had when it forked this child.
        "peak_rss_kb": hwm if hwm > 0 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_reset_before_call": reset,
        **({"exact": extra} if extra else {}),
    }))


def _run_child(what: str, n: int, threads: int, env: dict, cache_mb: float | None = None) -> dict:
    extra = [] if cache_mb is None else ["--child-cache-mb", str(cache_mb)]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", what,
         "--child-batches", str(n), "--threads", str(threads), *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {what} {n} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: glibc: every allocation of 64 KiB or more is mmapped and goes back to the OS when freed
#: (no dynamic threshold), so RSS follows the live tensors instead of what malloc keeps.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def bench_memory(cfg) -> dict:
    allocators = {"fixed_mmap_threshold": FIXED_MMAP}
    whats = ["probe", "recal_population"]
    if not cfg.quick:  # the default allocator, the update_bn control, a one-shot generator
        allocators["default"] = {}
        whats += ["update_bn", "recal_population_generator"]
    out: dict[str, Any] = {"model": "MemNet (bench_models.py)", "batch_shape": list(bm.MEM_SHAPE),
                           "calls": {"probe": "varshift.probe(model, generator)",
                                     "recal_population": "varshift.recalibrate(model, "
                                     "re-iterable) (default: measure=True, 3 passes)",
                                     "update_bn": "update_bn(re-iterable, deepcopy)",
                                     "recal_population_generator": "varshift.recalibrate("
                                     "model, generator, measure=False)"},
                           "allocators": allocators}
    for what in whats:
        out[what] = {}
        for alloc, env in allocators.items():
            rows = {n: _run_child(what, n, cfg.threads, env) for n in (10, 100)}
            a, b = rows[10], rows[100]
            out[what][alloc] = {
                "runs": rows,
                "peak_ratio_100_vs_10": b["peak_rss_kb"] / a["peak_rss_kb"],
                "peak_above_pre_call_kb": [r["peak_rss_kb"] - r["rss_before_kb"] for r in (a, b)],
            }
    # The exact estimator keeps the activations alive at a cut for every batch: MemNet's are
    # 8 MiB per batch, 320 MiB at 40 batches. Against --cache-mb: ample, 64 and 16 MiB (the
    # last two force spilling to a temporary directory).
    n = 40
    out["recal_exact"] = {"batches": n, "per_batch_frontier_mb": 8.0, "budgets": {}}
    for budget in (None, 64.0, 16.0):
        r = _run_child("recal_exact", n, cfg.threads, FIXED_MMAP, budget)
        r["peak_above_pre_call_mb"] = (r["peak_rss_kb"] - r["rss_before_kb"]) / 1024
        out["recal_exact"]["budgets"]["default" if budget is None else f"{budget:g}"] = r
    return out


# --------------------------------------------------------------------------- 6. precision


def bench_precision(cfg) -> dict:
    model, batches = bm.precision_net()
    ref = bm.reference_stats(model, batches)
    names = {m: n for n, m in model.named_modules() if m in ref}
    out: dict[str, Any] = {
        "model": "PrecisionNet (bench_models.py)",
        "batches": len(batches),
        "batch_shape": list(batches[0].shape),
        "bn_input": {
            names[m]: {"count": c,
                       "mean_range": [mean.min().item(), mean.max().item()],
                       "std_range": [var.sqrt().min().item(), var.sqrt().max().item()]}
            for m, (mean, var, c) in ref.items()
        },
        "methods": {},
    }

    def compare(fixed: nn.Module, unbias: bool = False) -> dict:
        res = {}
        fixed_bns = dict(zip(bm.bn_modules(model), bm.bn_modules(fixed)))
        for m, (mean, var, count) in ref.items():
            f = fixed_bns[m]
            rv = f.running_var.detach().double()
            if unbias:
                rv = rv * count / (count - 1)
            rm = f.running_mean.detach().double()
            res[names[m]] = {
                "max_rel_var_err": ((rv - var).abs() / var).max().item(),
                "max_mean_err_in_std": ((rm - mean).abs() / var.sqrt()).max().item(),
                "min_running_var": rv.min().item(),
            }
        res["max_rel_var_err"] = max(v["max_rel_var_err"] for v in res.values())
        return res

    fixed, _ = varshift.recalibrate(model, batches, exact=False, measure=False)
    out["methods"]["varshift_population"] = compare(fixed)
    if fvcore_update_bn_stats is not None:
        c = copy.deepcopy(model)
        run_fvcore(c, batches)
        out["methods"]["fvcore_update_bn_stats"] = compare(c)
        out["methods"]["fvcore_update_bn_stats_times_n_over_n-1"] = compare(c, unbias=True)
    else:
        out["fvcore_skipped"] = "fvcore is not installed (pip install fvcore)"
    c = copy.deepcopy(model)
    update_bn(batches, c)
    out["methods"]["update_bn_dropout_on"] = compare(c)
    c = copy.deepcopy(model)
    for m in c.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    update_bn(batches, c)
    out["methods"]["update_bn_dropout_p0"] = compare(c)
    return out


# --------------------------------------------------------------------------- report


def fmt(x: float, digits: int = 3) -> str:
    if x != x:
        return "nan"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}f}"
    return f"{x:.2e}"


def summarize(res: dict, cfg) -> list[dict]:
    rows: list[dict] = []
    res = dict(res)
    for name in BENCHES:
        if isinstance(res.get(name), dict) and "error" in res[name]:
            rows.append({"bench": name, "what": "ERROR", "value": None, "target": None,
                         "met": None, "note": res.pop(name)["error"][:200]})

    def row(bench, what, value, target=None, met=None, note=""):
        rows.append({"bench": bench, "what": what, "value": value, "target": target,
                     "met": met, "note": note})

    if "probe" in res:
        for name, r in res["probe"].items():
            if not isinstance(r, dict):
                row("1 probe", name, None, note=str(r))
                continue
            t = r["times"]
            if name == "densenet_x4_batches":
                row("1 probe", f"  densenet121, {r['batches']} batches (fixed cost amortized)",
                    r["ratio"], "<= 1.3", r["ratio"] <= TARGETS["probe"],
                    f"probe {fmt(med(t, 'probe'))}s, eval {fmt(med(t, 'eval_pass'))}s, "
                    f"update_bn {fmt(med(t, 'update_bn'))}s")
                continue
            row("1 probe", f"{name}: probe / (eval + update_bn)", r["ratio"],
                "<= 1.3", r["ratio"] <= TARGETS["probe"],
                f"probe {fmt(med(t, 'probe'))}s, eval {fmt(med(t, 'eval_pass'))}s, "
                f"update_bn {fmt(med(t, 'update_bn'))}s")
    if "memory" in res:
        for key, label, tkey in (("probe", "2 probe memory", "probe_memory"),
                                 ("recal_population", "5 recal memory", "recal_memory"),
                                 ("update_bn", "  (control)", None),
                                 ("recal_population_generator", "  (info)", None)):
            if key not in res["memory"]:
                continue
            r = res["memory"][key]["fixed_mmap_threshold"]
            d = res["memory"][key].get("default")
            ratio = r["peak_ratio_100_vs_10"]
            g10, g100 = (g / 1024 for g in r["peak_above_pre_call_kb"])
            peaks = [r["runs"][n]["peak_rss_kb"] / 1024 for n in (10, 100)]
            row(label, f"{key}: peak RSS 100 / 10 batches", ratio,
                "<= 1.05" if tkey else None,
                (abs(ratio - 1) <= 0.05) if tkey else None,
                f"peak {peaks[0]:.0f} -> {peaks[1]:.0f} MiB, {g10:.0f} -> {g100:.0f} MiB above "
                f"pre-call RSS" + (f"; default malloc: ratio {d['peak_ratio_100_vs_10']:.3f}"
                                   if d else ""))
    if "recal_population" in res:
        r = res["recal_population"]
        if "skipped" in r:
            row("3 recal population", "skipped", None, note=r["skipped"])
        else:
            t = r["times"]
            row("3 recal population", "recalibrate(measure=False) / update_bn",
                r["ratio_vs_update_bn"], "<= 1.1",
                r["ratio_vs_update_bn"] <= TARGETS["recal_population"],
                f"{fmt(med(t, 'recal_measure_false'))}s vs {fmt(med(t, 'update_bn'))}s; "
                f"includes its deepcopy and fx scan ({fmt(r['scan_s'])}s)")
            row("3 recal population", "  same, inplace=True (no internal copy)",
                r["ratio_inplace_vs_update_bn"], "<= 1.1",
                r["ratio_inplace_vs_update_bn"] <= TARGETS["recal_population"])
            if "x4_batches" in r:
                x4 = r["x4_batches"]
                row("3 recal population",
                    f"  same, {x4['batches']} batches (fixed cost amortized)",
                    x4["ratio_vs_update_bn"], "<= 1.1",
                    x4["ratio_vs_update_bn"] <= TARGETS["recal_population"])
            row("3 recal population", "default call (measure=True, 3 passes) / update_bn", r["ratio_default_measure_true_vs_update_bn"],
                note="not a target; measurement included")
            if "ratio_inplace_vs_fvcore" in r:
                row("6 vs fvcore speed", "recalibrate(inplace) / fvcore update_bn_stats", r["ratio_inplace_vs_fvcore"], "<= 1.1 (match)",
                    r["ratio_inplace_vs_fvcore"] <= TARGETS["vs_fvcore_speed"],
                    f"{fmt(med(t, 'recal_measure_false_inplace'))}s vs "
                    f"{fmt(med(t, 'fvcore_update_bn_stats'))}s")
                x4 = r.get("x4_batches", {})
                if "ratio_inplace_vs_fvcore" in x4:
                    row("6 vs fvcore speed", f"  same, {x4['batches']} batches",
                        x4["ratio_inplace_vs_fvcore"], "<= 1.1 (match)",
                        x4["ratio_inplace_vs_fvcore"] <= TARGETS["vs_fvcore_speed"],
                        f"{fmt(med(x4['times'], 'recal_measure_false_inplace'))}s vs "
                        f"{fmt(med(x4['times'], 'fvcore_update_bn_stats'))}s")
            else:
                row("6 vs fvcore speed", "skipped", None, note=r.get("fvcore_skipped", ""))
    if "exact" in res:
        r = res["exact"]
        if "skipped" in r:
            row("4 recal exact", "skipped", None, note=r["skipped"])
        else:
            t = r["times"]
            info = r["exact_info"]
            row("4 recal exact", "densenet121: exact / population (same data)",
                r["ratio_exact_vs_population"], "<= 1.5",
                r["ratio_exact_vs_population"] <= TARGETS["exact_vs_population"],
                f"{fmt(med(t, 'recal_exact'))}s vs {fmt(med(t, 'recal_population'))}s; "
                f"path {r['path']}, {r['cuts']} cuts, frontier peak {info['peak_mb']:.0f} MiB")
            row("4 recal exact", "  exact / one eval pass", r["time_eval_pass_equivalents"],
                note=f"eval {fmt(med(t, 'eval_pass'))}s; exact / update_bn "
                     f"{fmt(r['ratio_exact_vs_update_bn'])}")
            row("4 recal exact", "  passes over the data", r["passes"],
                note=f"{r['levels']} dependency levels, {r['affected']}/{r['norms']} norms "
                     "affected (fx)")
            row("4 recal exact", "  work, full-forward equivalents (MACs)",
                r["mac_forward_equivalents"], note="one batch; nothing after the last norm runs")
            if "per_level_path" in r:
                lv = r["per_level_path"]
                row("4 recal exact", "  per-level path (before): time / eval pass",
                    lv["time_eval_pass_equivalents"],
                    note=f"{fmt(lv['time_s'])}s, {lv['passes']} passes, "
                         f"{fmt(lv['mac_forward_equivalents'])} forwards of MACs, "
                         f"{fmt(lv['ratio_vs_population'])}x population")
            for name, o in r.get("others", {}).items():
                row("4 recal exact", f"{name}: exact / population",
                    o["ratio_exact_vs_population"], "<= 1.5",
                    o["ratio_exact_vs_population"] <= TARGETS["exact_vs_population"],
                    f"{fmt(med(o['times'], 'recal_exact'))}s vs "
                    f"{fmt(med(o['times'], 'recal_population'))}s; path "
                    f"{o['exact_info']['path']}, {o['passes']} pass(es); exact / eval "
                    f"{fmt(o['time_eval_pass_equivalents'])}")
    if "memory" in res and "recal_exact" in res["memory"]:
        r = res["memory"]["recal_exact"]
        for budget, c in r["budgets"].items():
            e = c["exact"]
            within = e["kept_mb"] <= e["cache_mb"]
            row("7 exact memory", f"--cache-mb {budget if budget != 'default' else 'default'}"
                f" ({r['batches']} MemNet batches): peak above pre-call RSS (MiB)",
                c["peak_above_pre_call_mb"], "kept <= budget", within,
                f"budget {e['cache_mb']:.0f} MiB, frontier {e['peak_mb']:.0f} MiB, kept "
                f"{e['kept_mb']:.0f} MiB, spilled {e['spilled_mb']:.0f} MiB")
    if "precision" in res:
        r = res["precision"]
        methods = r["methods"]
        fv = methods.get("fvcore_update_bn_stats", {}).get("max_rel_var_err")
        for method, m in methods.items():
            target = met = None
            if method == "varshift_population" and fv is not None:
                target, met = "< fvcore's", m["max_rel_var_err"] < fv
            row("6 precision", f"{method}: max rel. err running_var", m["max_rel_var_err"],
                target, met,
                ", ".join(f"{k} {fmt(v['max_rel_var_err'])} (min var {fmt(v['min_running_var'])})"
                          for k, v in m.items() if isinstance(v, dict)))
        if fv is None:
            row("6 precision", "fvcore skipped", None, note=r.get("fvcore_skipped", ""))
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\nvarshift bench  torch {meta['torch']}  threads {meta['threads']}  "
          f"{meta['cpu']} x{meta['cpus']}  mode {meta['mode']}")
    w1 = max(len(r["bench"]) for r in rows)
    w2 = max(len(r["what"]) for r in rows)
    for r in rows:
        v = r["value"]
        value = "-" if v is None else (str(v) if isinstance(v, int) else fmt(v))
        met = "" if r["met"] is None else ("MET" if r["met"] else "MISSED")
        target = r["target"] or ""
        print(f"{r['bench']:<{w1}}  {r['what']:<{w2}}  {value:>9}  {target:<14} {met:<6}  "
              f"{r['note']}")


def meta(cfg) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torchvision
        tv = torchvision.__version__
    except ImportError:
        tv = None
    try:
        import fvcore
        fv = getattr(fvcore, "__version__", "installed")
    except ImportError:
        fv = None
    try:  # read-only: which varshift was measured
        rev = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain",
                                "--", "varshift"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        if rev and dirty:
            rev += " + uncommitted changes in varshift/"
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "mode": "quick" if cfg.quick else "full",
        "git": rev,
        "torch": torch.__version__,
        "torchvision": tv,
        "fvcore": fv,
        "varshift": varshift.__version__ if hasattr(varshift, "__version__") else None,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "densenet": {"size": cfg.size, "batch": cfg.batch, "batches": cfg.batches,
                     "exact_levels": cfg.exact_levels},
        "reps": cfg.reps,
        "exact_reps": cfg.exact_reps,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


BENCHES = {
    "probe": bench_probe,
    "memory": bench_memory,
    "recal_population": bench_recal_population,
    "exact": bench_exact,
    "precision": bench_precision,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (~1-2 min)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: steadiest on a shared machine)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    ap.add_argument("--size", type=int, default=64, help="DenseNet input height/width")
    ap.add_argument("--batch", type=int, default=16, help="DenseNet batch size")
    ap.add_argument("--batches", type=int, default=6, help="DenseNet number of batches")
    ap.add_argument("--output", default=None,
                    help="where to write the JSON (default: bench/results.json; with --quick, "
                    "bench/results_quick.json, which git ignores)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-batches", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-cache-mb", type=float, help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    if cfg.child:
        child(cfg.child, cfg.child_batches, cfg.threads, cfg.child_cache_mb)
        return 0
    torch.set_num_threads(cfg.threads)
    cfg.reps = cfg.reps or (2 if cfg.quick else 7)
    cfg.exact_reps = cfg.reps
    cfg.exact_levels = not cfg.quick  # the per-level path alone is ~90 eval passes
    if cfg.output is None:
        # a quick run never replaces the full run's tracked results.json
        cfg.output = str(HERE / ("results_quick.json" if cfg.quick else "results.json"))
    cfg.scaling = not cfg.quick
    only = [s for s in cfg.only.split(",") if s] or list(BENCHES)
    unknown = set(only) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHES)}")
    if fvcore_update_bn_stats is None:
        print("note: fvcore is not installed; the fvcore comparisons are skipped "
              "(pip install fvcore to include them)", file=sys.stderr)
    results: dict[str, Any] = {"meta": meta(cfg)}
    t_all = time.perf_counter()
    failed: list[str] = []
    for name in only:
        t0 = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            results[name] = BENCHES[name](cfg)
        except Exception as exc:  # report it and go on with the other benchmarks
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        print(f"[{name}] {time.perf_counter() - t0:.0f}s  load {load_note()}",
              file=sys.stderr, flush=True)
    results["meta"]["total_s"] = time.perf_counter() - t_all
    rows = summarize(results, cfg)
    results["summary"] = rows
    Path(cfg.output).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print_table(rows, results["meta"])
    print(f"\n{results['meta']['total_s']:.0f}s; wrote {cfg.output}")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see the traceback above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
