"""Conformance: every `*_tracker*.pt` in $RVOS_GOLDEN reproduced end to end.

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

import pytest
import torch

from lib.safe_load import load_pth
from models import build_tracker

from conftest import GOLDEN, seeded_backbone_state

CASES = sorted(GOLDEN.glob("*_tracker*.pt")) if GOLDEN.is_dir() else []


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
    """(H, W) margin of frame t's label decision, per golden/README.md: upstream's merge of the
    vector's logits (objects starting at t enter with their given mask as probability 1, the
    tracked objects' probabilities multiplied by 1 minus that mask), soft masks s with background
    first, and with s1 >= s2 the two largest: min(s1 - s2, |s1 - 0.5|)."""
    eps = 1e-7
    entering = [(case["labels"][t, 0] == i).double() for i in start_frames(case).get(t, [])]
    rows = []
    for _, r in sorted(case["raw"][t - 1].items()):
        p = torch.sigmoid(r["logits"][0, 0].double())
        for mask in entering:
            p = p * (1 - mask)
        rows.append(p)
    p = torch.stack(rows + entering).clamp(eps, 1 - eps)
    background = (1 - p).min(dim=0, keepdim=True).values
    p = torch.cat([background, p])
    s = torch.softmax(p / (1 - p), dim=0)
    top = s.topk(2, dim=0).values
    return torch.minimum(top[0] - top[1], (top[0] - 0.5).abs())


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
    return load_pth(request.param)


@pytest.fixture(scope="module")
def run(case):
    backbone = seeded_backbone_state(case["ftext"], case["backbone_seed"], case["backbone_checksum"])
    tracker = build_tracker(case["checkpoint"], fast=case["fast"], num_aug=case["num_aug"],
                            backbone_weights=backbone, ftext=case["ftext"])
    return tracker.run_sequence(frames_of(case), threshold=case["threshold"], keep_raw=True)


def test_golden_files_exist():
    assert CASES, f"no *_tracker*.pt in {GOLDEN}"


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
