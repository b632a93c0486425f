"""The frame loop's host synchronisations and reduced precision (issue 10): the tracker waits on
the device a fixed number of times per frame whatever the object count, bf16 runs on the CPU and
agrees with fp32, the target model stays fp32, and precisions a device cannot run are refused."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.synthetic import render_sequence
from models import build_tracker
from models.network import GFRTM
from lib import precision
from lib.precision import check_precision, full_fp32
from models.target_model import TargetModel, TargetModelConfig
from models.tracker import fetch

SIZE = (120, 216)
FRAMES = 7


def clip(num_objects: int):
    images, labels = render_sequence([5], FRAMES, SIZE, num_objects)
    ids = list(range(1, num_objects + 1))
    return [(torch.from_numpy(images[t]).permute(2, 0, 1).contiguous(),
             torch.from_numpy(labels[t]) if t == 0 else None, ids if t == 0 else []) for t in range(FRAMES)]


@pytest.fixture(scope="module")
def checkpoint():
    torch.manual_seed(0)
    net = GFRTM("resnet18").eval()
    with torch.no_grad():  # reuse probabilities around 0.5, so both paths are taken
        net.reuse_gate.conv2.bias.copy_(torch.tensor([0.0, 0.0]))
    return {"format": "reuse-vos", "backbone": "resnet18", "model": net.state_dict()}


def tracker_for(checkpoint, **kw):
    return build_tracker(checkpoint, backbone_weights="random", num_aug=1, seed=0, **kw)


def median_reuse_prob(checkpoint, frames) -> float:
    probs = [p for r in tracker_for(checkpoint).track(frames, threshold=0.999999) for p in r.reuse_prob.values()]
    return float(np.median(probs))


# ---------------------------------------------------------------------------------------------
# Host synchronisations


class SyncCounter:
    """Counts calls that make the host wait for the device (on CUDA), by patching Tensor methods:
    scalar and list reads, bool/int/float conversions, copies to the CPU, nonzero / unique, and
    indexing with a boolean mask (a nonzero) or a Python list (a blocking host-to-device copy)."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero", "unique",
               "masked_select")
    FUNCTIONS = ("nonzero", "unique", "masked_select", "argwhere")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        for name in self.FUNCTIONS:
            monkeypatch.setattr(torch, name, self._counted(getattr(torch, name)))
        to, getitem = torch.Tensor.to, torch.Tensor.__getitem__

        def counted_to(t, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                self.count += 1
            return to(t, *args, **kwargs)

        def counted_getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, list) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool) for i in parts):
                self.count += 1
            return getitem(t, index)

        monkeypatch.setattr(torch.Tensor, "to", counted_to)
        monkeypatch.setattr(torch.Tensor, "__getitem__", counted_getitem)

    def _counted(self, method):
        def wrapper(*args, **kwargs):
            self.count += 1
            return method(*args, **kwargs)
        return wrapper


def syncs_per_frame(tracker, frames, threshold, monkeypatch, **kw) -> tuple[list[int], list]:
    """Synchronisations of each tracked frame after the first (no object starts there)."""
    with monkeypatch.context() as m:
        counter = SyncCounter(m)
        counts, results = [], []
        before = 0
        for result in tracker.track(frames, threshold, **kw):
            counts.append(counter.count - before)
            results.append(result)
            before = counter.count
    return counts[1:], results[1:]


def test_syncs_per_frame_do_not_grow_with_objects(checkpoint, monkeypatch):
    per_objects = {}
    for n in (1, 2, 3):
        frames = clip(n)
        threshold = median_reuse_prob(checkpoint, frames)
        counts, results = syncs_per_frame(tracker_for(checkpoint), frames, threshold, monkeypatch)
        decisions = [v for r in results for v in r.reused.values()]
        assert any(decisions) and not all(decisions), f"{n} objects: both paths must be exercised"
        if n == 2:  # frames with a computed object (target-model updates) and all-reused frames
            assert any(all(r.reused.values()) for r in results)
            assert any(not all(r.reused.values()) for r in results)
        per_objects[n] = counts
    assert np.mean(per_objects[2]) <= 3, per_objects
    # A per-object synchronisation would make 3 objects cost more than 1 on some frame.
    assert max(per_objects[3]) == max(per_objects[1]) and min(per_objects[3]) == min(per_objects[1]), per_objects


def test_no_sync_for_probabilities_unless_asked(checkpoint, monkeypatch):
    frames = clip(2)
    threshold = median_reuse_prob(checkpoint, frames)
    kept, with_probs = syncs_per_frame(tracker_for(checkpoint), frames, threshold, monkeypatch)
    dropped, without = syncs_per_frame(tracker_for(checkpoint), frames, threshold, monkeypatch,
                                       keep_probabilities=False, keep_raw=True)
    assert kept == dropped  # probabilities (and raw outputs) travel with the labels
    assert all(r.probabilities and not r.scores for r in with_probs)
    assert all(not r.probabilities and r.scores and r.logits for r in without)
    for a, b in zip(with_probs, without):
        assert torch.equal(a.labels, b.labels) and a.reused == b.reused


def test_fetch_returns_separate_host_tensors():
    tensors = [torch.arange(5, dtype=torch.uint8), torch.rand(2, 3), torch.tensor([True, False]),
               torch.arange(3, dtype=torch.int64)]
    out = fetch(tensors)
    for a, b in zip(tensors, out):
        assert a.dtype == b.dtype and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert len({o.untyped_storage().data_ptr() for o in out}) == len(out)  # each torch.save-able alone


# ---------------------------------------------------------------------------------------------
# Precision


def test_bf16_runs_on_cpu_and_agrees_with_fp32(checkpoint):
    frames = clip(2)
    threshold = median_reuse_prob(checkpoint, frames)
    fp32 = tracker_for(checkpoint).run_sequence(frames, threshold)
    tracker = tracker_for(checkpoint, precision="bf16")
    assert {p.dtype for p in tracker.network.parameters()} == {torch.bfloat16}
    bf16 = tracker.run_sequence(frames, threshold)
    gates_agree, gates = 0, 0
    for a, b in zip(fp32.frames[1:], bf16.frames[1:]):
        for k, p in b.probabilities.items():
            assert p.dtype == torch.float32 and torch.isfinite(p).all()
            assert (p - a.probabilities[k]).abs().mean() < 0.01
            assert abs(a.reuse_prob[k] - b.reuse_prob[k]) < 0.05
            gates += 1
            gates_agree += a.reused[k] == b.reused[k]
    assert gates_agree / gates >= 0.75, (gates_agree, gates)


def test_target_model_stays_fp32_under_autocast():
    torch.manual_seed(0)
    model = TargetModel(8, TargetModelConfig(channels=4, init_iters=(2,), update_iters=(2,)))
    features, masks = torch.randn(2, 8, 6, 10), (torch.rand(2, 1, 24, 40) > 0.6).float()
    model.initialize(features, masks)
    plain = model.apply(features[:1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.apply(features[:1].bfloat16())
        projected = torch.nn.functional.conv2d(features[:1], model.project.weight)
    assert projected.dtype == torch.bfloat16  # autocast is on around the target model
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, TargetModel.apply(model, features[:1].bfloat16().float()))
    assert not torch.equal(plain, scores)  # the input was rounded to bf16, the rest was not


def test_full_fp32_switches_tf32_off_and_restores(monkeypatch):
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    with full_fp32("cuda"):
        assert getattr(matmul, name) in ("ieee", False)
    assert getattr(matmul, name) == before
    with torch.autocast("cpu", dtype=torch.bfloat16), full_fp32("cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_precisions_a_device_cannot_run_are_refused(monkeypatch):
    assert check_precision("fp32", "cpu") is None
    assert check_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="--precision.*fp32, bf16, fp16"):
        check_precision("half", "cpu")
    monkeypatch.setattr(precision, "_cpu_supports_fp16", lambda: False)
    with pytest.raises(ValueError, match="--precision fp16.*use --precision bf16"):
        check_precision("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ValueError, match="--precision bf16.*V100.*use --precision fp16"):
        check_precision("bf16", "cuda:0")
    assert check_precision("fp16", "cuda:0") == torch.float16


def test_gpu_check_without_cuda_says_so_and_succeeds():
    root = Path(__file__).resolve().parents[1]
    venv = Path(sys.executable).parents[1]
    stamp = venv / ".requirements.sha256"
    if not stamp.is_file() or stamp.read_text().strip() != hashlib.sha256((root / "requirements.txt").read_bytes()).hexdigest():
        pytest.skip(f"{venv} is not a scripts/setup_env.sh environment")
    out = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "RVOS_VENV": str(venv), "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "no CUDA GPU" in out.stdout


def test_gpu_check_runs_with_a_given_python():
    """RVOS_PYTHON (scripts/setup_env.sh) uses that interpreter as it is: no environment is made."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env={**os.environ, "RVOS_PYTHON": sys.executable, "RVOS_VENV": "/nonexistent/venv",
                              "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU" in out.stdout and "[setup]" not in out.stderr
