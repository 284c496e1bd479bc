"""`varshift probe|recalibrate` under torchrun: one file, written once, equal to one process.

Real processes over gloo on the loopback interface: torchrun itself for the success path,
and ranks started by hand (the environment torchrun sets) where each rank's exit code and
stderr must be seen.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_module, subprocess_env

pytestmark = pytest.mark.slow

MODEL = REPO / "sample_models" / "digits_dropout_bn.pt"
CALIB = REPO / "sample_models" / "digits_calib.pt"
# 512 samples in batches of 48: ten of 48 and one of 32, split 6/5 (2 ranks) or 4/4/3.
BATCH = "48"


def torchrun(n: int, *argv: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
         "-m", "varshift", *map(str, argv)],
        capture_output=True, text=True, cwd=cwd, env=subprocess_env(OMP_NUM_THREADS="1"),
        timeout=300,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(n: int, *argv: object, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start ``n`` ranks by hand with torchrun's environment; wait for all."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "varshift", *map(str, argv)], cwd=cwd, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=subprocess_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n),
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                               VARSHIFT_DIST_TIMEOUT="60"),
        )
        for r in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def buffers(path: Path) -> dict[str, torch.Tensor]:
    module = torch.load(path, weights_only=False)
    return {k: v for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("n", [2, 3])
def test_recalibrate_under_torchrun_writes_the_one_process_file(tmp_path: Path, n: int) -> None:
    one = tmp_path / "one.pt"
    single = run_module("recalibrate", MODEL, "--data", CALIB, "--batch-size", BATCH, "--exact",
                        "-o", one, "--format", "json", cwd=tmp_path)
    assert single.code == 0, single.err
    many = tmp_path / "many.pt"
    proc = torchrun(n, "recalibrate", MODEL, "--data", CALIB, "--batch-size", BATCH, "--exact",
                    "-o", many, "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # one report: rank 0 alone prints
    assert doc["samples"] == 512 and doc["batches"] == 11
    assert any(f"{n} ranks" in note for note in doc["notes"])
    want, got = buffers(one), buffers(many)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-9)
    # nothing else was written beside the output (rank 0 wrote it, once)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.pt", "one.pt"]


def test_probe_ranks_agree_and_rank_zero_prints(tmp_path: Path) -> None:
    single = run_module("probe", MODEL, "--data", CALIB, "--batch-size", BATCH, "--format",
                        "json", cwd=tmp_path)
    results = ranks(2, "probe", MODEL, "--data", CALIB, "--batch-size", BATCH, "--format",
                    "json", cwd=tmp_path)
    assert [r.returncode for r in results] == [single.code] * 2  # 1: the model is shifted
    assert results[1].stdout == "" and results[1].stderr == ""
    doc, want = json.loads(results[0].stdout), json.loads(single.out)
    assert doc["summary"]["samples"] == want["summary"]["samples"] == 512
    for got, ref in zip(doc["layers"], want["layers"]):
        assert got["name"] == ref["name"]
        assert got["eval_var_mean"] == pytest.approx(ref["eval_var_mean"], rel=1e-6)
        assert got["shift"] == pytest.approx(ref["shift"], rel=1e-6)


FAILING_DATA = '''
import os
import torch

def batches():
    x, y = torch.load({calib!r})
    for i in range(0, 512, 64):
        if i == 192 and os.environ.get("RANK") == "1":
            raise RuntimeError("disk on node 1 went away")
        yield x[i:i + 64], y[i:i + 64]
'''


def test_a_failing_rank_ends_every_rank_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "failing.py").write_text(FAILING_DATA.format(calib=str(CALIB)))
    out = tmp_path / "fixed.pt"
    results = ranks(3, "recalibrate", MODEL, "--data", "failing.py:batches", "-o", out,
                    cwd=tmp_path)
    assert [r.returncode for r in results] == [2, 2, 2], [r.stderr for r in results]
    lines = results[0].stderr.strip().splitlines()
    assert len(lines) == 1 and "disk on node 1 went away" in lines[0], results[0].stderr
    assert lines[0].startswith("varshift: error: ")
    assert all(r.stderr == "" for r in results[1:])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failing.py"]


SHARDED_DATA = '''
import torch

def batches(rank=0, world_size=1):
    x, y = torch.load({calib!r})
    starts = list(range(0, 512, 48))
    for i in starts[rank::world_size]:
        yield x[i:i + 48], y[i:i + 48]
'''


def test_a_rank_aware_data_callable_shards_itself(tmp_path: Path) -> None:
    (tmp_path / "sharded.py").write_text(SHARDED_DATA.format(calib=str(CALIB)))
    one, many = tmp_path / "one.pt", tmp_path / "many.pt"
    single = run_module("recalibrate", MODEL, "--data", CALIB, "--batch-size", BATCH, "-o", one,
                        cwd=tmp_path)
    assert single.code == 0, single.err
    results = ranks(2, "recalibrate", MODEL, "--data", "sharded.py:batches", "-o", many,
                    "--format", "json", cwd=tmp_path)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    doc = json.loads(results[0].stdout)
    assert any("called with its rank and world_size" in n for n in doc["notes"])
    want, got = buffers(one), buffers(many)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-9)
