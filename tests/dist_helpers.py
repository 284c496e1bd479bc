"""Workers for the multi-process tests (importable by spawned children).

Each worker joins a gloo group over a file store, runs one varshift function on its own shard
of the batches, and saves what it got to ``out/rank{r}.pt`` for the parent to compare.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

SIZES = [16, 9, 16, 5, 16, 12, 3]  # 7 batches of different sizes


def batches(seed: int = 0, sizes=SIZES) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 3, 8, 8, generator=gen) + torch.arange(1, 4).view(1, 3, 1, 1)
        out.append((x, torch.randint(0, 10, (n,), generator=gen)))
    return out


def model() -> nn.Module:
    """conv -> Dropout(0.5) -> conv -> bn -> relu -> conv -> bn2 -> head; settled stats."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.5), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    with torch.no_grad():
        m.train()
        for x, _ in batches(seed=5):
            m(x)
    return m.eval()


def join(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def run(rank: int, world: int, store: str, out: str, what: str, fail_rank: int = -1,
        wrap: str = "", repeat: int = 1) -> None:
    """``what``: probe, population or exact. ``wrap``: "ddp" (a DistributedDataParallel
    wrapper) or "sync" (SyncBatchNorm layers; DDP refuses those on CPU). ``repeat``: use the
    batches that many times over (to count collectives against the number of batches)."""
    import varshift
    from varshift.distributed import TRAFFIC, resolve, shard

    torch.set_num_threads(1)
    join(rank, world, store)
    try:
        mine = list(shard(batches() * repeat, resolve()))
        if rank == fail_rank:
            mine[-1] = (torch.full_like(mine[-1][0], float("nan")), mine[-1][1])
        net = model()
        if wrap == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(net)
        elif wrap == "sync":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        result: dict = {}
        try:
            if what == "probe":
                rep = varshift.probe(net, mine, seed=0)
                result["report"] = rep.to_dict()
            else:
                fixed, rep = varshift.recalibrate(net, mine, exact=(what == "exact"))
                result["report"] = rep.to_dict()
                result["state"] = {k: v for k, v in fixed.state_dict().items()
                                   if "running" in k or "num_batches" in k}
                result["types"] = sorted({type(m).__name__ for m in fixed.modules()})
        except Exception as exc:  # noqa: BLE001 - recorded for the parent to check
            result["error"] = (type(exc).__name__, str(exc))
        result["traffic"] = dict(TRAFFIC)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
