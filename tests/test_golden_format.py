"""The conformance tests themselves: they must hold on any vector set in golden/README.md's
format, and they must fail when a vector disagrees.

A vector set unlike the shipped ones (3 objects, one entering at frame 2, another size, full
optimizer iterations, another backbone seed) is written in the README's format from our own
tracker, then tests/test_golden_tracker.py runs on it in a subprocess: it must pass with no skip.
Then it runs on mutated copies (a flipped gate, logits moved beyond the tolerance, a confident
label changed), each of which must fail in the test that checks that field.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from dataset.synthetic import render_sequence
from models import build_tracker
from models.checkpoint import to_upstream
from models.network import GFRTM

from conftest import ROOT

SIZE = (72, 136)
FRAMES = 6
STARTS = {0: [1, 3], 2: [2]}


def _checksum(state: dict) -> float:
    return sum(v.double().sum().item() for k, v in state.items() if v.is_floating_point() and not k.startswith("fc."))


def _frames(images, labels):
    for t in range(images.shape[0]):
        new = STARTS.get(t, [])
        yield images[t], (labels[t, 0] if new else None), new


def make_vector() -> dict:
    """A tracker vector in golden/README.md's format, produced by our tracker."""
    torch.manual_seed(5)
    net = GFRTM("resnet18")
    checkpoint = {"model": to_upstream(net.state_dict())}
    torch.manual_seed(7)
    backbone = torchvision.models.resnet18(weights=None).state_dict()
    images, labels = render_sequence([11], FRAMES, SIZE, 3)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(labels)[:, None].clone()
    for t, ids in STARTS.items():  # objects starting later are absent from earlier given masks
        for later in (i for s, ids_ in STARTS.items() if s > t for i in ids_):
            labels[t][labels[t] == later] = 0

    def run(threshold):
        tracker = build_tracker(checkpoint, fast=False, num_aug=1, backbone_weights=backbone)
        return tracker.run_sequence(_frames(images, labels), threshold=threshold, keep_raw=True)

    probs = [p for f in run(0.5).frames for p in f.reuse_prob.values()]
    threshold = float(torch.tensor(probs).median())
    result = run(threshold)
    return {
        "ftext": "resnet18", "backbone_seed": 7, "backbone_checksum": _checksum(backbone),
        "checkpoint": checkpoint, "fast": False, "num_aug": 1, "threshold": threshold,
        "images": images, "labels": labels, "start_frames": STARTS,
        "gates": [{k: int(v) for k, v in f.reused.items()} for f in result.frames[1:]],
        "raw": [{k: {"scores": f.scores[k], "logits": f.logits[k]} for k in f.reused} for f in result.frames[1:]],
        "output_labels": torch.stack(result.labels),
        "tolerance": {"scores": 1e-3, "logits": 1e-3, "label_tie": 1e-4},
    }


def run_conformance(golden: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RVOS_TRACKER_VECTORS=str(golden))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_golden_tracker.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def vector() -> dict:
    return make_vector()


def test_other_vector_set_passes(vector, tmp_path):
    gates = [v for g in vector["gates"] for v in g.values()]
    assert 0 < sum(gates) < len(gates), "the made-up vector should exercise both paths"
    assert set(vector["gates"][1]) == {1, 3} and set(vector["gates"][2]) == {1, 2, 3}
    torch.save(vector, tmp_path / "rn18_tracker_other.pt")
    proc = run_conformance(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" not in proc.stdout, proc.stdout


def test_mutated_vectors_fail(vector, tmp_path):
    flipped = copy.deepcopy(vector)
    flipped["gates"][3][2] = 1 - flipped["gates"][3][2]
    moved = copy.deepcopy(vector)
    moved["raw"][4][3]["logits"] += 5 * vector["tolerance"]["logits"]
    relabelled = copy.deepcopy(vector)
    labels = relabelled["output_labels"][FRAMES - 1]
    confident = labels == 0  # background pixels far from any object's boundary are confident
    confident[:, :8] = confident[:, -8:] = False
    labels[confident.nonzero()[0].tolist()] = 1
    for name, v in (("flipped", flipped), ("moved", moved), ("relabelled", relabelled)):
        torch.save(v, tmp_path / f"rn18_tracker_{name}.pt")
    proc = run_conformance(tmp_path)
    failed = {line.split("::")[1].split(" ")[0] for line in proc.stdout.splitlines() if line.startswith("FAILED")}
    d = tmp_path.name
    assert failed == {f"test_gates_exact[{d}/rn18_tracker_flipped.pt]",
                      f"test_scores_and_logits[{d}/rn18_tracker_moved.pt]",
                      f"test_output_labels[{d}/rn18_tracker_relabelled.pt]"}, proc.stdout
