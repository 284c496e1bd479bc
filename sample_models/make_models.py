"""Regenerate the sample models and data in sample_models/ (never run in CI).

Run from the repository root::

    python sample_models/make_models.py            # rewrites the files in sample_models/
    python sample_models/make_models.py --out DIR  # writes them into DIR instead

Needs scikit-learn (``pip install -e .[train]``) for ``load_digits``, which ships inside the
package (no download). Everything is deterministic: fixed seeds, one thread, deterministic
algorithms; running it twice on one machine writes byte-identical files (torch.save's zip has
fixed timestamps and its ``.data/serialization_id`` is a hash of the contents, and the
archive's inner folder is named after the file, so we save straight to the final path).
The data files are the same bytes on every machine; the trained models only on CPUs that run
the same kernels: torch picks its vectorized kernels by the CPU's instruction set (printed
first, "cpu capability"), and 30 epochs of SGD turn their last-bit differences into different
weights (see sample_models/README.md, "Determinism and checksums").

Writes:
    digits_dropout_bn.pt        whole nn.Sequential, nn.Dropout upstream of BatchNorm (shifted)
    digits_functional_ckpt.pt   training checkpoint of digits_functional.py's model (shifted)
    digits_clean.pt             whole nn.Sequential, dropout only after the last BatchNorm
    digits_calib.pt / .npy      calibration inputs (and labels in .pt) from the training split
    digits_test.pt              the held-out test split {"inputs", "labels"}

and prints, per model, each BatchNorm's variance shift and the held-out accuracy / NLL
before and after recomputing BN statistics with dropout off.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from digits_functional import build as build_functional  # noqa: E402

SEED = 0
N_TEST = 497          # held out; the other 1300 of the 1797 images are the training split
N_CALIB = 512         # calibration samples drawn from the training split
EPOCHS = 30
BATCH = 64
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
P_SEQUENTIAL = 0.5    # nn.Dropout before BatchNorm in digits_dropout_bn.pt
P_FUNCTIONAL = 0.3    # F.dropout rate of digits_functional.py (its build() default)
FUNCTIONAL_ARGS = {"drop_rate": P_FUNCTIONAL, "width": 16, "hidden": 64, "num_classes": 10}
P_CLEAN = 0.5         # nn.Dropout in the classifier head of digits_clean.pt


# --------------------------------------------------------------------------- setup


def set_determinism() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as float32 (N, 1, 8, 8) in [0, 1] and int64 labels; a seeded train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    perm = torch.from_numpy(np.random.RandomState(SEED).permutation(len(y)))
    test, train = perm[:N_TEST], perm[N_TEST:]
    return x[train].contiguous(), y[train].contiguous(), x[test].contiguous(), y[test].contiguous()


# --------------------------------------------------------------------------- models


def build_dropout_bn(p: float = P_SEQUENTIAL) -> nn.Sequential:
    """Conv-BN-ReLU-Conv-Dropout-BN-ReLU-Pool-Conv-BN-ReLU-Pool-Linear: dropout before BN.

    The dropout sits between a convolution and the next BatchNorm, where Wide ResNets put it
    (bn-relu-conv-dropout-bn-relu-conv); BN ``5`` sees it directly, BN ``9`` downstream.
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.Dropout(p),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),                      # 8x8 -> 4x4
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),                      # 4x4 -> 2x2
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 10),
    )


def build_clean(p: float = P_CLEAN) -> nn.Sequential:
    """The same convolutions with dropout only in the head, after the last BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(p),
        nn.Linear(64 * 2 * 2, 10),
    )


# --------------------------------------------------------------------------- training


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int):
    """Minibatch SGD with momentum and a cosine schedule; returns the optimizer."""
    torch.manual_seed(seed)  # dropout masks
    order = torch.Generator().manual_seed(seed)  # shuffling
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(y) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps_per_epoch)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), BATCH):
            idx = perm[i:i + BATCH]
            if len(idx) < 2:  # BatchNorm1d needs more than one sample per batch
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return opt


# --------------------------------------------------------------------------- measuring


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C, N * ...) in float64."""
    return x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()


@torch.no_grad()
def bn_input_stats(model: nn.Module,
                   x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN: population mean and unbiased variance of its input over ``x`` (model in eval).

    Returned in execution order. ``x`` is small, so the inputs are kept whole and reduced
    once, in float64.
    """
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, bn in bn_layers(model):
        def hook(mod, args, name=name):
            seen.setdefault(name, []).append(_channels_first(args[0]))
        handles.append(bn.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        for i in range(0, len(x), 256):
            model(x[i:i + 256])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, chunks in seen.items():
        flat = torch.cat(chunks, dim=1)
        out[name] = (flat.mean(dim=1), flat.var(dim=1, unbiased=True))
    return out


def shift_table(model: nn.Module, x: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """(name, mean running_var, mean eval_var, shift) per BN, in execution order."""
    stats = bn_input_stats(model, x)
    modules = dict(model.named_modules())
    rows = []
    for name, (_, var) in stats.items():
        running = modules[name].running_var.double()
        r = float(var.mean() / running.mean())
        rows.append((name, float(running.mean()), float(var.mean()), max(r, 1.0 / r)))
    return rows


@torch.no_grad()
def recalibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy whose BN statistics are the exact population stats of their eval-path inputs.

    Layer by layer in execution order, so each BN sees inputs normalized by the already
    updated upstream BNs; dropout is off (the whole model stays in eval mode).
    """
    fixed = copy.deepcopy(model).eval()
    modules = dict(fixed.named_modules())
    for name in list(bn_input_stats(fixed, x)):
        mean, var = bn_input_stats(fixed, x)[name]
        bn = modules[name]
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return fixed


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    acc = float((logits.argmax(1) == y).double().mean())
    nll = float(F.cross_entropy(logits.double(), y))
    return acc, nll


@torch.no_grad()
def output_stats(model: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and unbiased variance per channel of module ``name``'s output (eval)."""
    chunks: list[torch.Tensor] = []
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda mod, args, out: chunks.append(_channels_first(out)))
    try:
        model.eval()
        for i in range(0, len(x), 256):
            model(x[i:i + 256])
    finally:
        handle.remove()
    flat = torch.cat(chunks, dim=1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=True)


def predicted_shift(model: nn.Module, feeder: str, p: float, x: torch.Tensor) -> float:
    """The predicted shift (docs/concepts.md) for a BN right after dropout(p) fed by ``feeder``.

    Inverted dropout turns a channel with mean c and variance v into one with variance
    (v + p c^2) / (1 - p); the prediction compares the channel means of both variances.
    """
    c, v = output_stats(model, feeder, x)
    r = float(((v + p * c ** 2) / (1 - p)).mean() / v.mean())
    return max(r, 1.0 / r)


def report(title: str, model: nn.Module, calib: torch.Tensor, x_test: torch.Tensor,
           y_test: torch.Tensor, direct: dict[str, tuple[str, float]] | None = None) -> dict:
    """Print the shift table and the effect of recalibration; return the numbers.

    ``direct`` maps a BN that follows a dropout directly to (the module feeding that
    dropout, p), for the predicted-shift column.
    """
    direct = direct or {}
    rows = shift_table(model, calib)
    print(f"\n== {title}")
    print(f"  {'norm':<6} {'running_var':>12} {'eval_var':>12} {'shift':>7} {'predicted':>10}")
    for name, running, ev, shift in rows:
        pred = (f"{predicted_shift(model, *direct[name], calib):>10.3f}" if name in direct
                else f"{'':>10}")
        print(f"  {name:<6} {running:>12.5f} {ev:>12.5f} {shift:>7.3f} {pred}")
    acc0, nll0 = evaluate(model, x_test, y_test)
    fixed = recalibrate(model, calib)
    acc1, nll1 = evaluate(fixed, x_test, y_test)
    after = max(s for *_, s in shift_table(fixed, calib))
    print(f"  held-out test: accuracy {acc0:.4f} -> {acc1:.4f}, NLL {nll0:.4f} -> {nll1:.4f} "
          f"after recomputing BN stats with dropout off (max shift after: {after:.3f})")
    return {"shifts": rows, "before": (acc0, nll0), "after": (acc1, nll1)}


# --------------------------------------------------------------------------- main


def main(out: Path = HERE) -> None:
    """Train the three models, print their shift tables, and write every file into ``out``."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    set_determinism()
    x_train, y_train, x_test, y_test = load_data()
    pick = torch.from_numpy(np.random.RandomState(SEED + 1).permutation(len(y_train))[:N_CALIB])
    x_calib, y_calib = x_train[pick].contiguous(), y_train[pick].contiguous()
    print(f"torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()} (the trained bytes depend on it)")
    print(f"train {len(y_train)}, test {len(y_test)}, calibration {len(y_calib)} (from train)")

    torch.manual_seed(SEED + 10)
    seq = build_dropout_bn()
    train(seq, x_train, y_train, seed=SEED + 11)

    torch.manual_seed(SEED + 20)
    fun = build_functional(**FUNCTIONAL_ARGS)
    fun_opt = train(fun, x_train, y_train, seed=SEED + 21)

    torch.manual_seed(SEED + 30)
    clean = build_clean()
    train(clean, x_train, y_train, seed=SEED + 31)

    report("digits_dropout_bn.pt", seq, x_calib, x_test, y_test,
           direct={"5": ("3", P_SEQUENTIAL)})
    report("digits_functional_ckpt.pt", fun, x_calib, x_test, y_test,
           direct={"bn2": ("conv2", P_FUNCTIONAL)})
    report("digits_clean.pt", clean, x_calib, x_test, y_test)

    files = {
        "digits_dropout_bn.pt": seq,
        "digits_functional_ckpt.pt": {
            "epoch": EPOCHS,
            "model_state_dict": fun.state_dict(),
            "optimizer_state_dict": fun_opt.state_dict(),
            "config": dict(FUNCTIONAL_ARGS),  # build(**config) rebuilds the model
        },
        "digits_clean.pt": clean,
        "digits_calib.pt": (x_calib, y_calib),
        "digits_test.pt": {"inputs": x_test, "labels": y_test},
    }
    print()
    # Each file is written into a scratch folder under its final name (torch.save's zip names
    # its inner folder after the file's stem, so the bytes depend on the name) and then moved
    # into place: a reader never sees a half-written file.
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for name, obj in files.items():
            torch.save(obj, Path(scratch) / name)
            os.replace(Path(scratch) / name, out / name)
        np.save(Path(scratch) / "digits_calib.npy", x_calib.numpy())
        os.replace(Path(scratch) / "digits_calib.npy", out / "digits_calib.npy")
    for name in [*files, "digits_calib.npy"]:
        data = (out / name).read_bytes()
        print(f"  {hashlib.sha256(data).hexdigest()}  {len(data):>7}  {name}")
    print(f"\ndone in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE,
                        help="folder to write into (default: sample_models/, next to this script)")
    main(parser.parse_args().out)
