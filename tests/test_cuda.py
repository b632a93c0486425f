"""CUDA checks (scripts/gpu_check.sh runs them; skipped where torch sees no CUDA GPU): the tracker
on the GPU makes the CPU's decisions, bf16 follows fp32, and training runs one step, alone and
as a one-process NCCL DDP job."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import train
from models.tracker import merge_probabilities
from trainers.trainer import run_training

from test_tracker_fast import checkpoint, clip, tracker_for  # noqa: F401 (checkpoint is a fixture)
from test_training import ROOT, cli, parse, synthetic_root  # noqa: F401 (synthetic_root is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
DEV = "cuda:0"
LABEL_TIE = 1e-3  # labels may differ where the CPU's decision margin is below this


def separating_threshold(checkpoint, frames) -> float:
    """A threshold between two of the CPU's reuse probabilities near their median, as far from
    both as possible, so that float differences between devices cannot flip a gate."""
    probs = sorted(p for r in tracker_for(checkpoint).track(frames, threshold=0.999999) for p in r.reuse_prob.values())
    middle = probs[len(probs) // 4: 3 * len(probs) // 4 + 1]
    gaps = [(b - a, (a + b) / 2) for a, b in zip(middle, middle[1:])]
    return max(gaps)[1]


def decision_margin(probabilities: dict[int, torch.Tensor]) -> torch.Tensor:
    """(H, W) margin of the label decision from the merged probabilities: min(s1 - s2, |s1 - 0.5|)."""
    rows = [probabilities[k].double() for k in sorted(probabilities)]
    soft, _ = merge_probabilities(torch.stack([torch.zeros_like(rows[0])] + rows))
    top = soft.topk(2, dim=0).values
    return torch.minimum(top[0] - top[1], (top[0] - 0.5).abs())


def test_tracker_on_cuda_makes_the_cpu_decisions(checkpoint):  # noqa: F811
    frames = clip(2)
    th = separating_threshold(checkpoint, frames)
    cpu = tracker_for(checkpoint).run_sequence(frames, th)
    gpu = tracker_for(checkpoint, device=DEV).run_sequence(frames, th)
    decisions = [v for f in cpu.frames for v in f.reused.values()]
    assert any(decisions) and not all(decisions), "both paths must be exercised"
    for t, (a, b) in enumerate(zip(cpu.frames, gpu.frames)):
        assert a.reused == b.reused, f"frame {t}: gates differ"
        differ = a.labels != b.labels
        if t > 0 and differ.any():
            margin = decision_margin(a.probabilities)
            assert (margin[differ] < LABEL_TIE).all(), f"frame {t}: {int(differ.sum())} labels differ beyond ties"
        for k, p in a.probabilities.items():
            torch.testing.assert_close(b.probabilities[k], p, atol=1e-3, rtol=0)


def test_frame_loop_waits_on_the_gpu_twice_per_frame(checkpoint):  # noqa: F811
    """CUDA's own sync detector (torch.cuda.set_sync_debug_mode) counts the waits that the CPU
    test (tests/test_tracker_fast.py) counts by patching: at most 2 per tracked frame."""
    frames = clip(3)
    th = separating_threshold(checkpoint, frames)
    tracker = tracker_for(checkpoint, device=DEV)
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in tracker.track(frames, th):
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
                caught.clear()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print(f"host waits per frame on {torch.cuda.get_device_name(0)}: {counts}")
    assert 1 <= max(counts[1:]) <= 2, counts


def test_bf16_follows_fp32_on_cuda(checkpoint):  # noqa: F811
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16")
    frames = clip(2)
    th = separating_threshold(checkpoint, frames)
    fp32 = tracker_for(checkpoint, device=DEV).run_sequence(frames, th)
    bf16 = tracker_for(checkpoint, device=DEV, precision="bf16").run_sequence(frames, th)
    agree = [a.reused[k] == b.reused[k] for a, b in zip(fp32.frames[1:], bf16.frames[1:]) for k in a.reused]
    assert np.mean(agree) >= 0.75
    for a, b in zip(fp32.frames[1:], bf16.frames[1:]):
        for k, p in b.probabilities.items():
            assert torch.isfinite(p).all() and (p - a.probabilities[k]).abs().mean() < 0.01


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_training_step_on_cuda(synthetic_root, tmp_path, precision):  # noqa: F811
    args = parse(tmp_path, synthetic_root, "--epochs", "1", "--dev", DEV, *(
        ["--precision", precision] if "--precision" in train.get_parser().format_help() else []))
    run_training(args)
    assert (tmp_path / "ck" / "t" / "t_ep0001.pth").is_file()


def test_one_process_nccl_ddp_step(synthetic_root, tmp_path):  # noqa: F811
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(ROOT / "train.py"), *cli(tmp_path, synthetic_root, "--batch-size", "1", "--workers", "0",
                                                       "--epochs", "1", "--dev", DEV)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 process(es)" in out.stdout
    assert (tmp_path / "ck" / "t" / "t_ep0001.pth").is_file()
