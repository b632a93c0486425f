"""Conformance: every `*_tracker*.pt` in $RVOS_GOLDEN (the shared vectors) and in
tests/golden_upstream (ours, made with upstream's code by scripts/make_upstream_vectors.py)
reproduced end to end ($RVOS_TRACKER_VECTORS, directories separated by os.pathsep, replaces both).

Everything comes from the vector and the rules of golden/README.md ("rn18_tracker*.pt"): which
objects start on which frame (`start_frames`), the image size, the frame count, the settings
(`fast`, `num_aug`, `threshold`) and each vector's own `tolerance`:
* gates must match exactly, for every object-frame the vector lists (and no other);
* decoder input scores within `tolerance["scores"]`, mask logits within `tolerance["logits"]`,
  for every object-frame (the target model is trained from random weights by float32
  Gauss-Newton/CG, which amplifies rounding: the README's tolerances are twice upstream's own
  spread over thread counts);
* output labels may differ only at pixels whose decision margin, computed from the vector's own
  logits by the README's merge rule, is within `tolerance["label_tie"]`.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from lib.safe_load import load_pth
from models import build_tracker

from conftest import ROOT, TRACKER_VECTOR_DIRS, seeded_backbone_state

_spec = importlib.util.spec_from_file_location("make_upstream_vectors", ROOT / "scripts" / "make_upstream_vectors.py")
make_upstream_vectors = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(make_upstream_vectors)

CASES = [case for d in TRACKER_VECTOR_DIRS for case in sorted(d.glob("*_tracker*.pt"))]


def start_frames(case) -> dict[int, list[int]]:
    """Frame index -> ids of the objects whose given mask starts at that frame."""
    return {int(t): [int(i) for i in ids] for t, ids in case["start_frames"].items()}


def frames_of(case):
    """(image, labels or None, new ids) per frame, as the tracker takes them."""
    starts = start_frames(case)
    for t in range(case["images"].shape[0]):
        new = starts.get(t, [])
        yield case["images"][t], (case["labels"][t, 0] if new else None), new


def decision_margin(case, t: int) -> torch.Tensor:
    """(H, W) margin of frame t's label decision, per golden/README.md (the vector maker's rule:
    upstream's merge of the vector's logits, the objects starting at t entering with their given
    masks)."""
    return make_upstream_vectors.decision_margin(case["labels"][t, 0], start_frames(case), case["raw"][t - 1], t)


@pytest.fixture(scope="module", params=CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def case(request):
    return load_pth(request.param)


@pytest.fixture(scope="module")
def run(case):
    backbone = seeded_backbone_state(case["ftext"], case["backbone_seed"], case["backbone_checksum"])
    tracker = build_tracker(case["checkpoint"], fast=case["fast"], num_aug=case["num_aug"],
                            backbone_weights=backbone, ftext=case["ftext"])
    return tracker.run_sequence(frames_of(case), threshold=case["threshold"], keep_raw=True)


@pytest.mark.parametrize("directory", TRACKER_VECTOR_DIRS, ids=str)
def test_golden_files_exist(directory):
    assert sorted(directory.glob("*_tracker*.pt")), f"no *_tracker*.pt in {directory}"


def test_vector_format(case):
    """The fields the README promises, consistent with each other."""
    T = case["images"].shape[0]
    assert case["labels"].shape[0] == T and case["output_labels"].shape[0] == T
    assert len(case["gates"]) == len(case["raw"]) == T - 1
    assert set(case["tolerance"]) >= {"scores", "logits", "label_tie"}
    started = set()
    for i in range(T - 1):
        started |= set(start_frames(case).get(i, []))
        assert {int(k) for k in case["gates"][i]} == started, f"gates[{i}]"
        assert {int(k) for k in case["raw"][i]} == started, f"raw[{i}]"


def test_gates_exact(case, run):
    got = [run.frames[i + 1].reused for i in range(len(case["gates"]))]
    expected = [{int(k): bool(v) for k, v in g.items()} for g in case["gates"]]
    assert got == expected


def test_scores_and_logits(case, run):
    tol = case["tolerance"]
    for i, raw in enumerate(case["raw"]):
        frame = run.frames[i + 1]
        assert set(frame.scores) == {int(k) for k in raw}, f"frame {i + 1}: tracked objects"
        for obj_id, r in raw.items():
            where = f"frame {i + 1}, object {obj_id}"
            torch.testing.assert_close(frame.scores[int(obj_id)], r["scores"], atol=tol["scores"], rtol=0,
                                       msg=lambda m: f"{where}: scores: {m}")
            torch.testing.assert_close(frame.logits[int(obj_id)], r["logits"], atol=tol["logits"], rtol=0,
                                       msg=lambda m: f"{where}: logits: {m}")


def test_output_labels(case, run):
    expected = case["output_labels"].reshape(case["output_labels"].shape[0], *case["images"].shape[-2:])
    got = torch.stack(run.labels)
    assert got.shape == expected.shape
    assert torch.equal(got[0], expected[0]), "frame 0 must be the given labels"
    for t in range(1, got.shape[0]):
        differ = got[t] != expected[t]
        if differ.any():
            margin = decision_margin(case, t)[differ]
            assert (margin <= case["tolerance"]["label_tie"]).all(), (
                f"frame {t}: {int((margin > case['tolerance']['label_tie']).sum())} labels differ beyond the "
                f"tie margin {case['tolerance']['label_tie']} (largest margin {float(margin.max()):.3g})")


def test_lockstep_gates_and_labels_equal_one_at_a_time(case, run):
    """Four copies of the case tracked in lockstep (`track_many`, batch 4: frames, objects,
    target-model scores, inserts and re-optimisations batched) give the gates of one at a time,
    scores and logits within the vector's tolerances, and the same labels except at
    decision-margin ties (the decoder's convolutions on a larger batch round otherwise, and the
    target models learn from the decoder's masks)."""
    backbone = seeded_backbone_state(case["ftext"], case["backbone_seed"], case["backbone_checksum"])
    tracker = build_tracker(case["checkpoint"], fast=case["fast"], num_aug=case["num_aug"],
                            backbone_weights=backbone, ftext=case["ftext"])
    copies: dict[int, list] = {}
    for key, result in tracker.track_many([(i, frames_of(case)) for i in range(4)], threshold=case["threshold"],
                                          batch=4, keep_raw=True):
        copies.setdefault(key, []).append(result)
    assert sorted(copies) == [0, 1, 2, 3]
    for frames in copies.values():
        assert [f.reused for f in frames] == [f.reused for f in run.frames]
        for t, (got, want) in enumerate(zip(frames, run.frames)):
            for obj_id in want.scores:
                torch.testing.assert_close(got.scores[obj_id], want.scores[obj_id], atol=case["tolerance"]["scores"],
                                           rtol=0)
                torch.testing.assert_close(got.logits[obj_id], want.logits[obj_id], atol=case["tolerance"]["logits"],
                                           rtol=0)
            differ = got.labels != want.labels
            if differ.any():
                assert (decision_margin(case, t)[differ] <= case["tolerance"]["label_tie"]).all(), f"frame {t}"
