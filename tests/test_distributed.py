"""probe and recalibrate across processes (gloo on CPU): the same numbers as one process.

Each rank gets every ``world``-th batch of seven batches of different sizes, so the shards
differ in size and count (2 and 3 do not divide 7).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import varshift
import dist_helpers as H

pytestmark = pytest.mark.slow


def spawn(tmp_path: Path, world: int, what: str, fail_rank: int = -1,
          wrap: str = "", repeat: int = 1) -> list[dict]:
    store = tmp_path / "store"
    mp.spawn(H.run, args=(world, str(store), str(tmp_path), what, fail_rank, wrap, repeat),
             nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("world", [2, 3])
def test_probe_equals_one_process(tmp_path: Path, world: int) -> None:
    ranks = spawn(tmp_path, world, "probe")
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    docs = [r["report"] for r in ranks]
    assert all(doc == docs[0] for doc in docs[1:])  # bit-identical on every rank
    single = varshift.probe(H.model(), H.batches(), seed=0).to_dict()
    assert docs[0]["summary"]["samples"] == sum(H.SIZES) == single["summary"]["samples"]
    assert [l["name"] for l in docs[0]["layers"]] == [l["name"] for l in single["layers"]]
    for got, want in zip(docs[0]["layers"], single["layers"]):
        for key in ("running_var_mean", "eval_var_mean", "shift", "channel_shift_median",
                    "channel_shift_max"):
            assert close(got[key], want[key]), (got["name"], key, got[key], want[key])


def test_a_failing_rank_fails_every_rank_with_its_message(tmp_path: Path) -> None:
    ranks = spawn(tmp_path, 3, "probe", fail_rank=1)
    errors = [r.get("error") for r in ranks]
    assert all(e is not None for e in errors), errors
    assert all("NaN/Inf" in e[1] for e in errors), errors
    assert errors[0][0] == "RemoteError" and errors[1][0] == "DataError"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("what", ["population", "exact"])
def test_recalibrate_equals_one_process(tmp_path: Path, world: int, what: str) -> None:
    ranks = spawn(tmp_path, world, what)
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    states = [r["state"] for r in ranks]
    for state in states[1:]:  # bit-identical buffers on every rank
        assert all(torch.equal(state[k], states[0][k]) for k in states[0])
    assert all(r["report"] == ranks[0]["report"] for r in ranks[1:])
    fixed, rep = varshift.recalibrate(H.model(), H.batches(), exact=(what == "exact"))
    want = {k: v for k, v in fixed.state_dict().items() if "running" in k or "num_batches" in k}
    for key, value in want.items():
        got = states[0][key]
        if value.is_floating_point():
            torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(got, value), key
    doc = ranks[0]["report"]
    assert doc["samples"] == sum(H.SIZES) and doc["batches"] == len(H.SIZES)
    single = rep.to_dict()["metrics"]  # accuracy and NLL summed over the ranks' batches
    for when in ("before", "after"):
        got, ref = doc["metrics"][when], single[when]
        assert got["samples"] == ref["samples"] == sum(H.SIZES)
        assert got["accuracy"] == ref["accuracy"]
        assert close(got["nll"], ref["nll"], rel=1e-9)
    if what == "exact":
        assert all(abs(l["shift_after"] - 1) < 1e-3 for l in doc["layers"] if l["recalibrated"])


@pytest.mark.parametrize("wrap", ["ddp", "sync"])
def test_inside_a_users_ddp_job(tmp_path: Path, wrap: str) -> None:
    """A DistributedDataParallel wrapper is unwrapped; SyncBatchNorm layers run per process
    during the pass (no per-batch all-reduce, CPU tensors allowed) and stay SyncBatchNorm.
    Either way the result equals one process with plain BatchNorm."""
    ranks = spawn(tmp_path, 2, "population", wrap=wrap)
    assert all("error" not in r for r in ranks), [r.get("error") for r in ranks]
    assert "DistributedDataParallel" not in ranks[0]["types"]
    assert ("SyncBatchNorm" in ranks[0]["types"]) == (wrap == "sync")
    fixed, _ = varshift.recalibrate(H.model(), H.batches())
    for key, value in fixed.state_dict().items():
        if "running" in key:
            assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("what", ["probe", "population"])
def test_communication_does_not_grow_with_the_batches(tmp_path: Path, what: str) -> None:
    """Merges happen once per pass: three times the batches, the same collectives and the
    same bytes (O(channels) per norm)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    once = spawn(tmp_path / "a", 2, what)[0]["traffic"]
    thrice = spawn(tmp_path / "b", 2, what, repeat=3)[0]["traffic"]
    assert once["collectives"] == thrice["collectives"] > 0
    assert abs(once["bytes_sent"] - thrice["bytes_sent"]) < 64  # pickled integers may grow
