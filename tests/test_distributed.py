"""Sequence-parallel evaluation: sharding, the torchrun set-up, and 2-process gloo runs on CPU
against a 1-process run (byte-identical PNGs, equal J&F), --resume across process counts, a
failing rank, and --dev cuda with fewer GPUs than local ranks.

The multi-process runs use the reduced real DAVIS sequences of test_evaluate (120x216, 6
frames, 2 sequences): a few seconds each plus process start-up.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from lib import distributed
from lib.background import BackgroundWriter, read_ahead
from tests.test_evaluate import DAVIS_SEQS, checkpoint, davis_root, run  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


# ---------------------------------------------------------------------------------------------
# Library functions


def test_shard_balances_frames_times_objects():
    costs = {"a": 100, "b": 60, "c": 50, "d": 40, "e": 10, "f": 10}
    shards = distributed.shard(costs, 2)
    assert sorted(n for s in shards for n in s) == sorted(costs)  # each exactly once
    assert shards == [["a", "d"], ["b", "c", "e", "f"]]  # longest first, to the least loaded rank
    assert distributed.shard(costs, 2) == shards  # deterministic: every rank computes the same
    assert [sum(costs[n] for n in s) for s in shards] == [140, 130]
    assert distributed.shard(costs, 1) == [["a", "b", "c", "d", "e", "f"]]
    assert distributed.shard({"x": 1}, 3) == [["x"], [], []]
    with pytest.raises(ValueError):
        distributed.shard(costs, 0)


def test_launch_context_and_rank_device(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.launch_context()
    assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
    assert distributed.rank_device(ctx, "cuda:3") == "cuda:3"  # one process: --dev as given
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ctx = distributed.launch_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert distributed.rank_device(ctx, "cpu") == "cpu"
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="--nproc_per_node") as err:
            distributed.rank_device(ctx, "cuda")
        assert "2 processes" in str(err.value) and f"only {torch.cuda.device_count()} CUDA" in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "many")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.launch_context()


def test_first_failure_names_rank_and_sequence():
    ok = {"failure": None}
    assert distributed.first_failure([ok, ok], 2) is None
    bad = {"failure": {"sequence": "dog", "error": "cannot decode image x.jpg"}}
    message = distributed.first_failure([ok, bad, bad], 3)
    assert message.startswith("rank 1 of 3 failed on sequence 'dog': cannot decode image x.jpg")
    assert "1 other rank(s)" in message


def test_read_ahead_and_background_writer(tmp_path):
    assert list(read_ahead(iter(range(5)), depth=2)) == [0, 1, 2, 3, 4]

    def frames():
        for i in range(6):
            if i == 3:
                raise ValueError("frame 3 is corrupt")
            yield i

    got = []
    with pytest.raises(ValueError, match="frame 3"):
        for item in read_ahead(frames(), depth=2):
            got.append(item)
    assert got == [0, 1, 2]

    written = []
    with BackgroundWriter(max_pending=2) as writer:
        for i in range(10):
            writer.submit(tmp_path / f"{i}.png", partial(written.append, i))
        writer.flush()
    assert written == list(range(10))

    def fail(i):
        if i == 2:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space") as err:
        with BackgroundWriter(max_pending=1) as writer:
            for i in range(50):
                writer.submit(tmp_path / f"{i}.png", partial(fail, i))
            writer.flush()
    assert str(tmp_path / "2.png") in str(err.value)  # the failure names its path


# ---------------------------------------------------------------------------------------------
# torchrun on CPU (gloo)


def torchrun(nproc: int, checkpoint, out: Path, *argv, dev: str = "cpu") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DAVIS_ROOT", "RVOS_OUTPUT", "RVOS_MODELS")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "evaluate.py"), "--model", str(checkpoint), "--backbone-weights", "random", "--num-aug", "1",
           "--dev", dev, "--output-root", str(out), "--TH", "0.5", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env, timeout=TIMEOUT)


def png_bytes(results_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(results_dir)): p.read_bytes() for p in sorted(results_dir.glob("*/*.png"))}


@pytest.fixture(scope="module")
def single(checkpoint, davis_root, tmp_path_factory):
    """One process with one intra-op thread, as torchrun's processes (OMP_NUM_THREADS=1): CPU
    kernels sum in another order with another thread count, so only equal counts give equal
    bytes."""
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run(checkpoint, out, "--dset", "dv2017val", "--davis-root", str(davis_root), "--TH", "0.5")
    finally:
        torch.set_num_threads(threads)
    return Path(results["results_dir"]), results


def test_two_processes_match_one(checkpoint, davis_root, single, tmp_path):
    one_dir, one = single
    proc = torchrun(2, checkpoint, tmp_path, "--dset", "dv2017val", "--davis-root", str(davis_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_dir = tmp_path / "result" / one_dir.name
    assert png_bytes(two_dir) == png_bytes(one_dir) and len(png_bytes(one_dir)) == 12
    two = json.loads((two_dir / "results.json").read_text())
    assert two["J&F"] == one["J&F"] and two["J"] == one["J"] and two["F"] == one["F"]
    for name in DAVIS_SEQS:
        assert two["sequences"][name]["J&F"] == one["sequences"][name]["J&F"]
        assert two["sequences"][name]["reused_object_frames"] == one["sequences"][name]["reused_object_frames"]
    assert two["reuse_rate"] == one["reuse_rate"] and two["world_size"] == 2 and two["backend"] == "gloo"
    # Each rank tracked its share: motocross-jump (2 objects) on rank 0, car-shadow on rank 1.
    assert [r["sequences"] for r in two["ranks"]] == [["motocross-jump"], ["car-shadow"]]
    assert two["sequences"]["car-shadow"]["rank"] == 1
    assert two["frames"] == sum(r["frames"] for r in two["ranks"])
    assert two["seconds"] == pytest.approx(sum(r["tracker_seconds"] for r in two["ranks"]))
    assert two["wall_seconds"] == pytest.approx(max(r["wall_seconds"] for r in two["ranks"]))
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("J&F ") for line in lines) == 1  # rank 0 alone reports
    assert sum(line.startswith("device: ") for line in lines) == 1
    assert not [p for p in two_dir.iterdir() if p.name.startswith(".")]


def test_resume_with_another_process_count(checkpoint, davis_root, single, tmp_path):
    """Sequences finished by a 1-process run are kept by a 2-process --resume run, and the
    other way round."""
    one_dir, _ = single
    dst = tmp_path / "result" / one_dir.name
    shutil.copytree(one_dir, dst)
    shutil.rmtree(dst / "car-shadow")
    kept = {p.name: p.stat().st_mtime_ns for p in (dst / "motocross-jump").iterdir()}
    proc = torchrun(2, checkpoint, tmp_path, "--dset", "dv2017val", "--davis-root", str(davis_root), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((dst / "results.json").read_text())
    assert results["sequences_computed"] == ["car-shadow"]
    assert {p.name: p.stat().st_mtime_ns for p in (dst / "motocross-jump").iterdir()} == kept
    assert png_bytes(dst) == png_bytes(one_dir)
    again = run(checkpoint, tmp_path, "--dset", "dv2017val", "--davis-root", str(davis_root), "--TH", "0.5",
                "--resume")
    assert again["sequences_computed"] == [] and again["J&F"] == results["J&F"]


def test_failing_rank_names_rank_and_sequence(checkpoint, davis_root, tmp_path):
    davis = tmp_path / "davis"
    shutil.copytree(davis_root, davis)
    bad = davis / "JPEGImages" / "480p" / "motocross-jump" / "00003.jpg"
    bad.write_bytes(b"corrupt")
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(2, checkpoint, out, "--dset", "dv2017val", "--davis-root", str(davis))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "rank 0 of 2 failed on sequence 'motocross-jump'" in errors[0] and str(bad) in errors[0]
    assert "--resume" in errors[0]
    results_dir = out / "result" / "dv2017val-rn18_0.5_fast"
    assert (results_dir / "car-shadow" / ".tracking.json").is_file()  # the other rank's sequence stays valid
    assert not (results_dir / "motocross-jump").exists()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 GPUs")
def test_cuda_with_fewer_gpus_than_ranks(checkpoint, davis_root, tmp_path):
    proc = torchrun(2, checkpoint, tmp_path, "--dset", "dv2017val", "--davis-root", str(davis_root), dev="cuda")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "--nproc_per_node" in errors[0] and "--dev cuda" in errors[0]
    assert not (tmp_path / "result").exists()
