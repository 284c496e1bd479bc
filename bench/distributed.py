"""2 processes x 1 thread vs 1 process x 1 thread: probe and recalibrate on DenseNet-121.

Side by side in one run, on the same model, data and machine:

* ``1 proc``: ``varshift.probe`` / ``varshift.recalibrate(measure=False)`` on all batches;
* ``N procs``: the same call on every rank (gloo on the loopback interface, a file store),
  each rank with batches ``r, r+N, ...``; the time is the slowest rank's, from a barrier
  before the call to its return (merges included; process start and model build excluded,
  as they are for the single process).

Also reports what one rank sent (collectives and pickled bytes) per call. Run in the venv
that has torchvision::

    .venv-arch/bin/python bench/distributed.py            # writes bench/distributed.json
    .venv-arch/bin/python bench/distributed.py --quick    # fewer repeats, prints only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_models as bm  # noqa: E402

import varshift  # noqa: E402
from varshift import distributed  # noqa: E402

HERE = Path(__file__).resolve().parent


def setup(cfg) -> tuple[torch.nn.Module, list]:
    torch.set_num_threads(1)
    return bm.densenet(cfg["size"], cfg["batch"], cfg["batches"])


def call(what: str, model, batches) -> None:
    if what == "probe":
        varshift.probe(model, batches)
    else:
        varshift.recalibrate(model, batches, exact=(what == "exact"), measure=False,
                             inplace=True)


def worker(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
    model, batches = setup(cfg)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    mine = batches[rank::world]
    result: dict = {}
    try:
        for what in cfg["what"]:
            times = []
            for _ in range(cfg["repeat"]):
                dist.barrier()
                before = dict(distributed.TRAFFIC)
                start = time.perf_counter()
                call(what, model, mine)
                times.append(time.perf_counter() - start)
                sent = {k: distributed.TRAFFIC[k] - before[k] for k in before}
            result[what] = {"times": times, **sent}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def single(cfg: dict) -> dict:
    model, batches = setup(cfg)
    return {
        what: {"times": [_timed(what, model, batches) for _ in range(cfg["repeat"])]}
        for what in cfg["what"]
    }


def _timed(what: str, model, batches) -> float:
    start = time.perf_counter()
    call(what, model, batches)
    return time.perf_counter() - start


def multi(cfg: dict, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "store"), cfg, tmp), nprocs=world)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    out = {}
    for what in cfg["what"]:
        # the job's time for one call is its slowest rank's
        times = [max(r[what]["times"][i] for r in ranks) for i in range(cfg["repeat"])]
        out[what] = {"times": times, "collectives": ranks[0][what]["collectives"],
                     "bytes_sent": ranks[0][what]["bytes_sent"]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat; do not write the file")
    args = parser.parse_args(argv)
    cfg = {"size": args.size, "batch": args.batch, "batches": args.batches,
           "repeat": 1 if args.quick else args.repeat,
           "what": ["probe", "population", "exact"]}
    # Alternate the two set-ups so that drifting load hits both alike.
    one, many = single(cfg), multi(cfg, args.procs)
    if cfg["repeat"] > 1:
        one2, many2 = single(cfg), multi(cfg, args.procs)
        for a, b in ((one, one2), (many, many2)):
            for what in cfg["what"]:
                a[what]["times"] += b[what]["times"]
    rows = []
    for what in cfg["what"]:
        t1 = statistics.median(one[what]["times"])
        tn = statistics.median(many[what]["times"])
        rows.append({"what": what, "one_proc_s": round(t1, 3), f"{args.procs}_procs_s": round(tn, 3),
                     "ratio": round(tn / t1, 3), "collectives": many[what]["collectives"],
                     "bytes_sent_per_rank": many[what]["bytes_sent"]})
    doc = {
        "config": {**cfg, "procs": args.procs, "threads_per_proc": 1,
                   "model": f"densenet121(drop_rate=0.2) {args.batch}x3x{args.size}x{args.size} "
                            f"x{args.batches} batches",
                   "torch": torch.__version__, "cpus": os.cpu_count(),
                   "load_avg": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows,
    }
    print(json.dumps(doc, indent=2))
    if not args.quick:
        (HERE / "distributed.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
