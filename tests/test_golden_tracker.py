"""Conformance: every `*_tracker*.pt` in $RVOS_GOLDEN reproduced end to end (SPEC §5-6).

Gates must match exactly; decoder input scores and mask logits within atol 1e-3; output labels
may differ only where the merged probabilities tie within 1e-4 (golden/README.md).

One measured exception: target-model scores on *computed* frames are compared at atol 2e-2.
The target model is trained from random initial weights by Gauss-Newton/CG in float32 on a
bilinear problem, and that optimization amplifies rounding: running the upstream code itself on
this 2-core machine gives scores 8e-3 away from the vector, bit-identical to ours, and changing
only torch's thread count (1..32) moves them by up to 1.6e-2. The module-level vectors
(test_golden_modules.py), which give the target model fixed initial weights and inputs, are met
at 1e-3 (measured: 1e-6). A wrong initialization or update rule moves these scores by 0.4 or more.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from models import build_tracker
from models.tracker import merge_probabilities

from conftest import GOLDEN

CASES = sorted(GOLDEN.glob("*_tracker*.pt")) if GOLDEN.is_dir() else []


def seeded_backbone_state(ftext: str, seed: int, checksum: float) -> dict:
    """The backbone weights the vectors were made with (golden/README.md); skip on mismatch."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, ftext)(weights=None).state_dict()
    total = sum(v.double().sum().item() for k, v in state.items() if v.is_floating_point() and not k.startswith("fc."))
    if abs(total - checksum) > 1e-6 * max(1.0, abs(checksum)):
        pytest.skip(f"torch {torch.__version__} builds different seeded {ftext} weights "
                    f"(checksum {total} != {checksum}): cannot compare")
    return state


def frames_of(case):
    """(image, labels or None, new ids) per frame from the case's start_frames."""
    starts = {int(k): list(v) for k, v in case["start_frames"].items()}
    for t in range(case["images"].shape[0]):
        new = starts.get(t, [])
        yield case["images"][t], (case["labels"][t, 0] if new else None), new


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
    return torch.load(request.param, weights_only=False)


@pytest.fixture(scope="module")
def run(case):
    backbone = seeded_backbone_state(case["ftext"], case["backbone_seed"], case["backbone_checksum"])
    tracker = build_tracker(case["checkpoint"], fast=case["fast"], num_aug=case["num_aug"],
                            backbone_weights=backbone, ftext=case["ftext"])
    return tracker.run_sequence(frames_of(case), threshold=case["threshold"], keep_raw=True)


def test_golden_files_exist():
    assert CASES, f"no *_tracker*.pt in {GOLDEN}"


def test_gates_exact(case, run):
    got = [run.frames[i + 1].reused for i in range(len(case["gates"]))]
    expected = [{int(k): bool(v) for k, v in g.items()} for g in case["gates"]]
    assert got == expected
    # The case must exercise both paths, or it could not catch a wrong one.
    flat = [v for g in expected for v in g.values()]
    assert any(flat) and not all(flat)


COMPUTED_SCORE_ATOL = 2e-2  # see the module docstring


def test_scores_and_logits(case, run):
    for i, raw in enumerate(case["raw"]):
        frame = run.frames[i + 1]
        for obj_id, r in raw.items():
            obj_id = int(obj_id)
            reused = bool(case["gates"][i][obj_id])
            # Reused scores come from the first-frame mask and Δ until the object first computes.
            first_computed = next((j for j, g in enumerate(case["gates"]) if not g[obj_id]), len(case["gates"]))
            atol = 1e-3 if reused and i < first_computed else COMPUTED_SCORE_ATOL
            torch.testing.assert_close(frame.scores[obj_id], r["scores"], atol=atol, rtol=0)
            torch.testing.assert_close(frame.logits[obj_id], r["logits"], atol=1e-3, rtol=0)


def test_output_labels(case, run):
    expected = case["output_labels"]
    got = torch.stack(run.labels)
    assert got.shape == expected.shape
    differ = got != expected
    if differ.any():
        # Allowed only where merged probabilities (recomputed from the golden logits) tie within 1e-4.
        for t in torch.nonzero(differ.flatten(1).any(1)).flatten().tolist():
            probs = [torch.sigmoid(case["raw"][t - 1][k]["logits"][0, 0]) for k in sorted(case["raw"][t - 1])]
            soft, _ = merge_probabilities(torch.stack([torch.zeros_like(probs[0])] + probs))
            top2 = soft.topk(2, dim=0).values
            gap = (top2[0] - top2[1])[differ[t]]
            assert (gap < 1e-4).all(), f"frame {t}: {int(differ[t].sum())} labels differ beyond ties"
