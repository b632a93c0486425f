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
from tests.test_evaluate import DAVIS_SEQS, checkpoint, davis_root, png_bytes, run  # noqa: F401  (fixtures)

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


def torchrun_command(nproc: int, checkpoint, out: Path, *argv, dev: str = "cpu",
                     script: Path = ROOT / "evaluate.py") -> tuple[list[str], dict]:
    """(command, environment) of a torchrun evaluation."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAVIS_ROOT", "RVOS_OUTPUT", "RVOS_MODELS")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), "--model", str(checkpoint), "--backbone-weights", "random", "--num-aug", "1",
           "--dev", dev, "--output-root", str(out), "--TH", "0.5", *argv]
    return cmd, env


def torchrun(nproc: int, checkpoint, out: Path, *argv, dev: str = "cpu") -> subprocess.CompletedProcess:
    cmd, env = torchrun_command(nproc, checkpoint, out, *argv, dev=dev)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env, timeout=TIMEOUT)


def error_lines(stderr: str) -> list[str]:
    """The lines that report an error to the user (ours, and argparse's `prog: error: ...`)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ") or ": error: " in line]


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
    """Sequences finished by a 1-process run are kept by a 2-process --resume run (its ranks
    tracking in lockstep, --batch-sequences), and the other way round."""
    one_dir, _ = single
    dst = tmp_path / "result" / one_dir.name
    shutil.copytree(one_dir, dst)
    shutil.rmtree(dst / "car-shadow")
    kept = {p.name: p.stat().st_mtime_ns for p in (dst / "motocross-jump").iterdir()}
    proc = torchrun(2, checkpoint, tmp_path, "--dset", "dv2017val", "--davis-root", str(davis_root), "--resume",
                    "--batch-sequences", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((dst / "results.json").read_text())
    assert results["args"]["batch_sequences"] == 2
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
    errors = error_lines(proc.stderr)
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
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "--nproc_per_node" in errors[0] and "--dev cuda" in errors[0]
    assert not (tmp_path / "result").exists()


@pytest.mark.parametrize("argv, says", [(["--TH", "2"], "--TH"), (["--davis-root", "missing"], "missing")])
def test_a_mistake_every_rank_sees_is_reported_once(checkpoint, argv, says, tmp_path):
    """A bad flag (argparse) and a missing data root: every rank fails the same way, one says so."""
    proc = torchrun(2, checkpoint, tmp_path, "--dset", "dv2017val", *argv)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and says in errors[0], proc.stderr[-3000:]
    assert proc.stderr.count("usage: ") == (argv[0] == "--TH")  # argparse's usage line, once


# evaluate.py whose read of car-shadow's frame 3 never returns (rank 1 tracks car-shadow).
STALLED_EVALUATE = f"""import runpy, sys, threading
sys.path.insert(0, {str(ROOT)!r})
import dataset.sequence
read_image = dataset.sequence.read_image

def stalled(path):
    if str(path).endswith("car-shadow/00003.jpg"):
        threading.Event().wait()
    return read_image(path)

dataset.sequence.read_image = stalled
sys.argv[0] = {str(ROOT / "evaluate.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_rank_killed_mid_sequence_stops_the_run_and_resume_finishes(checkpoint, davis_root, single, tmp_path):
    """Rank 1 (car-shadow) stalls reading frame 3: it is mid-sequence for certain (frames 0-1
    tracked and written) when it is killed with SIGKILL. torchrun stops rank 0 (SIGTERM) within
    its shutdown grace, one line says why, and --resume with the same command (without the stall)
    finishes with the bytes of an uninterrupted run."""
    import signal
    import time

    one_dir, _ = single
    out = tmp_path / "out"
    out.mkdir()
    stalled = tmp_path / "stalled_evaluate.py"
    stalled.write_text(STALLED_EVALUATE)
    argv = ("--dset", "dv2017val", "--davis-root", str(davis_root))
    cmd, env = torchrun_command(2, checkpoint, out, *argv, script=stalled)
    results_dir = out / "result" / one_dir.name
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True, cwd=out, env=env)
        try:
            deadline = time.monotonic() + TIMEOUT  # start-up and 3 frames
            while len(list(results_dir.glob(".car-shadow.*/0000[01].png"))) < 2:  # the tracker reads a frame ahead
                assert proc.poll() is None and time.monotonic() < deadline, "rank 1 never reached frame 3"
                time.sleep(0.05)
            os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
            # torchrun notices the death within its monitor interval, then gives the other ranks
            # its 30 s shutdown grace before SIGKILL; our ranks leave at once on SIGTERM.
            proc.wait(timeout=30 + 30)
        finally:
            stop(proc)
        stderr.seek(0)
        text = stderr.read()
    assert proc.returncode != 0
    errors = error_lines(text)
    assert len(errors) == 1, text[-3000:]
    assert "SIGTERM" in errors[0] or "died" in errors[0]
    assert not (results_dir / "car-shadow").exists()

    proc = torchrun(2, checkpoint, out, *argv, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "car-shadow" in json.loads((results_dir / "results.json").read_text())["sequences_computed"]
    assert png_bytes(results_dir) == png_bytes(one_dir)
    assert not [p for p in results_dir.iterdir() if p.name.startswith(".")]


def workers(launcher: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's workers (the children of the launcher process)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours
        ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
        if parent == launcher and ranks:
            found[ranks[0]] = int(stat.parent.name)
    return found


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    pid = workers(launcher).get(rank)
    assert pid is not None, f"no worker with RANK={rank} under pid {launcher}"
    return pid


def stop(proc: subprocess.Popen) -> None:
    """End a torchrun that is still running (a failed test), its workers included: SIGTERM (torchrun
    stops its workers), then SIGKILL for what is left after its 30 s shutdown grace."""
    import signal

    if proc.poll() is None:
        children = workers(proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=30 + 30)
        except subprocess.TimeoutExpired:
            for pid in children.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()


def test_peer_lost_tells_a_dead_process_from_a_bug():
    from lib.distributed import peer_lost

    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:61134. This is typically caused by a remote worker crashing.")
    assert peer_lost(gloo) and peer_lost(ConnectionError("gone"))
    assert not peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not peer_lost(ValueError("Connection closed by peer"))  # only the errors collectives raise
