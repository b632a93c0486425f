"""J / F / statistics against reference numbers from the official davis2017-evaluation code.

How the reference numbers were made (once, outside this repository):
  The official repository github.com/davisvideochallenge/davis2017-evaluation (commit ac7c43f)
  was exported to a scratch directory. A scratch script imported the case builders below
  (crafted_cases, real_mask_cases, build_eval_sequences) from this file and ran, unchanged:
  * per-frame cases: davis2017.metrics.db_eval_iou(gt, pred) and
    davis2017.metrics.db_eval_boundary(gt, pred) (i.e. f_measure(pred, gt), bound_th=0.008);
  * sequences: the sequences of build_eval_sequences were written to a DAVIS-layout root
    (palette PNGs, ImageSets/2017/val.txt) and the predictions to a results folder, then
    davis2017.evaluation.DAVISEvaluation(root, "semi-supervised", "val").evaluate(results),
    per object "<seq>_<i>" its J and F Mean/Recall/Decay (utils.db_statistics), and the global
    J&F = (mean J-Mean + mean F-Mean) / 2 as evaluation_method.py computes it.
  The printed values (repr, full float precision) are pasted below.
"""
from pathlib import Path

import numpy as np
import pytest

from lib.metrics import (boundary_f_measure, boundary_map, boundary_tolerance, evaluate_results,
                         evaluate_sequence, format_table, frame_statistics, jaccard_index,
                         write_results)
from lib.image_io import read_label_png

TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Case builders (also used, unchanged, by the scratch script that ran the official code)


def _ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def shift_mask(mask, dy, dx):
    """Translate a mask by (dy, dx) pixels, filling with background."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def erode_square(mask, radius):
    """Binary erosion with a (2r+1)^2 square, pixels outside the image count as background."""
    padded = np.pad(mask.astype(bool), radius, constant_values=False)
    h, w = mask.shape
    out = np.ones((h, w), dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out &= padded[dy:dy + h, dx:dx + w]
    return out


def dilate_square(mask, radius):
    return ~erode_square(~mask.astype(bool), radius)


def crafted_cases():
    """name -> (gt, pred) binary masks."""
    s = (60, 80)
    big = (240, 427)
    ring = _ellipse(s, 30, 40, 22, 30) & ~_ellipse(s, 30, 40, 9, 12)
    return {
        "rects": (_rect(s, 10, 40, 15, 55), _rect(s, 12, 44, 20, 62)),
        "ellipse_vs_rect": (_ellipse(s, 30, 40, 20, 28), _rect(s, 12, 50, 14, 66)),
        "touching_border": (_rect(s, 30, 60, 50, 80), _rect(s, 28, 60, 47, 80)),
        "ring_vs_filled": (ring, _ellipse(s, 30, 40, 22, 30)),
        "thin_lines": (_rect(s, 5, 55, 40, 41), _rect(s, 5, 55, 42, 43)),
        "full_vs_top_half": (np.ones(s, bool), _rect(s, 0, 30, 0, 80)),
        "both_empty": (np.zeros(s, bool), np.zeros(s, bool)),
        "gt_empty": (np.zeros(s, bool), _rect(s, 10, 20, 10, 20)),
        "pred_empty": (_rect(s, 10, 20, 10, 20), np.zeros(s, bool)),
        "big_ellipses": (_ellipse(big, 120, 200, 80, 130), _ellipse(big, 126, 195, 76, 137)),
        "big_two_blobs": (_ellipse(big, 60, 100, 40, 50) | _ellipse(big, 170, 300, 50, 90),
                          _ellipse(big, 64, 104, 40, 52) | _ellipse(big, 170, 296, 48, 80)),
    }


def real_mask_cases(davis_root):
    """name -> (gt, pred): real DAVIS masks (480 x 854) against perturbed copies."""
    def gt(seq, frame):
        return read_label_png(Path(davis_root) / "Annotations" / "480p" / seq / f"{frame:05d}.png") != 0

    dog10, dog30, libby5 = gt("dog", 10), gt("dog", 30), gt("libby", 5)
    return {
        "dog10_shifted": (dog10, shift_mask(dog10, 6, -9)),
        "dog30_eroded5": (dog30, erode_square(dog30, 5)),
        "dog30_dilated12": (dog30, dilate_square(dog30, 12)),
        "blackswan20_vs_dog20": (gt("blackswan", 20), gt("dog", 20)),
        "libby5_shifted": (libby5, shift_mask(libby5, -15, 20)),
    }


def _perturb_frame(labels, t, obj_ids):
    """Deterministic, frame-dependent corruption of a label map (a fake prediction)."""
    out = np.zeros_like(labels)
    for k, obj in enumerate(obj_ids):
        mask = labels == obj
        if (t + 3 * k) % 11 == 5:
            continue  # object lost on this frame
        mask = shift_mask(mask, (t % 7) - 3 + k, ((3 * t) % 11) - 5)
        if t > 20:
            mask = erode_square(mask, (t - 20) // 4)  # gets worse over time: non-zero decay
        out[mask] = obj
    return out


def build_eval_sequences(davis_root):
    """[(name, gt T x H x W, pred T x H x W, object_ids)]: two real single-object sequences and
    a two-object sequence made from real masks (dog = 1, blackswan = 2 where not dog)."""
    ann = Path(davis_root) / "Annotations" / "480p"

    def load(seq, n):
        return np.stack([read_label_png(ann / seq / f"{t:05d}.png") for t in range(n)])

    sequences = []
    for seq in ("car-shadow", "motocross-jump"):
        gt = load(seq, 40)
        pred = np.stack([_perturb_frame(gt[t], t, [1]) for t in range(len(gt))])
        sequences.append((seq, gt, pred, [1]))

    dog, swan = load("dog", 30), load("blackswan", 30)
    combo = np.where(dog != 0, 1, np.where(swan != 0, 2, 0)).astype(np.uint8)
    pred = np.stack([_perturb_frame(combo[t], t, [1, 2]) for t in range(len(combo))])
    sequences.append(("combo", combo, pred, [1, 2]))
    return sequences


# ---------------------------------------------------------------------------------------------
# Reference numbers from the official code (see the module docstring)

OFFICIAL_FRAME = {
    # name: (db_eval_iou, db_eval_boundary)
    'rects': (0.6265984654731458, 0.04166666666666667),
    'ellipse_vs_rect': (0.8333333333333334, 0.5088967971530249),
    'touching_border': (0.8522727272727273, 0.0),
    'ring_vs_filled': (0.8397094430992736, 0.828125),
    'thin_lines': (0.0, 0.5),
    'full_vs_top_half': (0.5, 0.0),
    'both_empty': (1.0, 1.0),
    'gt_empty': (0.0, 0.0),
    'pred_empty': (0.0, 0.0),
    'big_ellipses': (0.8872873277679887, 0.46177041868495516),
    'big_two_blobs': (0.8513025289979084, 0.5930732920474161),
    'dog10_shifted': (0.7652061999888087, 0.40033432326214147),
    'dog30_eroded5': (0.8123146955766524, 0.9933877868533645),
    'dog30_dilated12': (0.4193058241454655, 0.0),
    'blackswan20_vs_dog20': (0.058071141816823824, 0.18530493923514327),
    'libby5_shifted': (0.417345587350002, 0.32672839365743794),
}

OFFICIAL_SEQUENCES = {
    # "<seq>_<object index>": (J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay)
    'car-shadow_1': (0.8201431739596539, 0.8947368421052632, 0.08146010889415611, 0.8829437981353335, 0.8947368421052632, 0.04437229325743297),
    'motocross-jump_1': (0.7847434033097775, 0.8947368421052632, 0.13363418216654055, 0.8688452158918732, 0.8947368421052632, 0.05929239148741705),
    'combo_1': (0.8211557371841038, 0.8928571428571429, 0.002670466372070912, 0.8913812143765798, 0.8928571428571429, 0.005165749681970255),
    'combo_2': (0.7995289567509595, 0.8928571428571429, -0.009610326344520526, 0.8924535925112634, 0.8928571428571429, 0.0014124262105782437),
}

OFFICIAL_GLOBAL = {
    'J&F-Mean': 0.8451493865149431,
    'J-Mean': 0.8063928178011236,
    'J-Recall': 0.893796992481203,
    'J-Decay': 0.05203860777206176,
    'F-Mean': 0.8839059552287625,
    'F-Recall': 0.893796992481203,
    'F-Decay': 0.02756071515934963,
}

# davis2017.utils.db_statistics(values) with values = ((arange(n) * 37) % 101) / 100:
# n: (Mean, Recall, Decay)
OFFICIAL_STATISTICS = {
    1: (0.0, 0.0, 0.0),
    2: (0.185, 0.0, -0.37),
    3: (0.36999999999999994, 0.3333333333333333, -0.5549999999999999),
    4: (0.3025, 0.25, -0.235),
    5: (0.33599999999999997, 0.2, -0.09999999999999998),
    7: (0.3885714285714286, 0.2857142857142857, -0.15000000000000008),
    10: (0.453, 0.4, -0.23333333333333334),
    38: (0.49263157894736836, 0.47368421052631576, -0.057999999999999885),
    100: (0.4986, 0.49, -0.032307692307692315),
    255: (0.49831372549019604, 0.49019607843137253, -0.0022956730769231326),
}


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", list(crafted_cases()))
def test_crafted_masks_match_official(name):
    gt, pred = crafted_cases()[name]
    j_ref, f_ref = OFFICIAL_FRAME[name]
    assert jaccard_index(gt, pred) == pytest.approx(j_ref, abs=TOL)
    assert boundary_f_measure(gt, pred) == pytest.approx(f_ref, abs=TOL)


def test_real_masks_match_official(davis_sample):
    for name, (gt, pred) in real_mask_cases(davis_sample).items():
        j_ref, f_ref = OFFICIAL_FRAME[name]
        assert jaccard_index(gt, pred) == pytest.approx(j_ref, abs=TOL), name
        assert boundary_f_measure(gt, pred) == pytest.approx(f_ref, abs=TOL), name
        # J is symmetric; so is F (precision and recall swap).
        assert boundary_f_measure(pred, gt) == pytest.approx(f_ref, abs=TOL), name


@pytest.mark.parametrize("n", list(OFFICIAL_STATISTICS))
def test_statistics_match_official(n):
    values = ((np.arange(n) * 37) % 101) / 100.0
    stats = frame_statistics(values)
    mean, recall, decay = OFFICIAL_STATISTICS[n]
    assert stats["mean"] == pytest.approx(mean, abs=TOL)
    assert stats["recall"] == pytest.approx(recall, abs=TOL)
    assert stats["decay"] == pytest.approx(decay, abs=TOL)


def test_statistics_of_nothing_are_nan():
    assert all(np.isnan(v) for v in frame_statistics([]).values())


def test_sequences_match_official(davis_sample):
    results = evaluate_results(build_eval_sequences(davis_sample))
    assert results["num_objects"] == len(OFFICIAL_SEQUENCES)
    for key, ref in OFFICIAL_SEQUENCES.items():
        seq_name, index = key.rsplit("_", 1)
        obj = results["sequences"][seq_name]["objects"][int(index)]
        ours = (obj["J"]["mean"], obj["J"]["recall"], obj["J"]["decay"],
                obj["F"]["mean"], obj["F"]["recall"], obj["F"]["decay"])
        assert ours == pytest.approx(ref, abs=TOL), key
        assert obj["num_frames"] == (40 if seq_name != "combo" else 30) - 2

    assert results["J&F"] == pytest.approx(OFFICIAL_GLOBAL["J&F-Mean"], abs=TOL)
    for measure in ("J", "F"):
        for stat, column in (("mean", "Mean"), ("recall", "Recall"), ("decay", "Decay")):
            assert results[measure][stat] == pytest.approx(OFFICIAL_GLOBAL[f"{measure}-{column}"], abs=TOL)

    # A sequence's numbers are the means over its objects.
    combo = results["sequences"]["combo"]
    assert combo["J"]["mean"] == pytest.approx(
        (OFFICIAL_SEQUENCES["combo_1"][0] + OFFICIAL_SEQUENCES["combo_2"][0]) / 2, abs=TOL)


def test_boundary_tolerance_and_map():
    assert boundary_tolerance((480, 854)) == 8  # ceil(0.008 * 979.6)
    assert boundary_tolerance((60, 80)) == 1
    mask = np.zeros((5, 6), bool)
    mask[1:3, 2:4] = True
    expected = np.zeros((5, 6), bool)
    # Boundary pixels sit half a pixel towards the origin: rows 0-2, columns 1-3 minus the inside.
    expected[0, 1:4] = True
    expected[1:3, 1] = True
    expected[1:3, 3] = True
    expected[2, 1:4] = True
    expected[1, 2] = False
    assert np.array_equal(boundary_map(mask), expected)
    assert not boundary_map(np.ones((4, 4), bool)).any()


def test_object_starting_later_is_scored_after_its_first_frame():
    t, h, w = 10, 30, 40
    gt = np.zeros((t, h, w), np.uint8)
    gt[:, 5:15, 5:15] = 1
    gt[4:, 18:28, 20:35] = 2  # object 2 starts at frame 4
    pred = gt.copy()
    pred[1, 5:15, 5:15] = 0  # a miss on frame 1: counts for object 1 only
    pred[4, 18:28, 20:35] = 0  # a miss on object 2's first frame: not scored
    res = evaluate_sequence(gt, pred, [1, 2], first_frames={2: 4})
    obj1, obj2 = res["objects"][1], res["objects"][2]
    assert obj1["num_frames"] == t - 2 and obj2["num_frames"] == t - 4 - 2
    assert obj1["J"]["mean"] == pytest.approx((t - 3) / (t - 2))
    assert obj2["J"]["mean"] == 1.0 and obj2["F"]["mean"] == 1.0
    assert res["J"]["mean"] == pytest.approx((obj1["J"]["mean"] + 1.0) / 2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        evaluate_sequence(np.zeros((3, 4, 5), np.uint8), np.zeros((3, 4, 6), np.uint8), [1])
    with pytest.raises(ValueError, match="shape"):
        jaccard_index(np.zeros((4, 5)), np.zeros((5, 4)))


def test_write_results_and_table(tmp_path):
    t, h, w = 6, 20, 30
    gt = np.zeros((t, h, w), np.uint8)
    gt[:, 2:10, 3:12] = 1
    gt[:, 12:18, 15:28] = 2
    pred = gt.copy()
    pred[2:, 12:18, 15:28] = 0
    # Object 3 appears only in the last frame: nothing to score (NaN, written as null).
    gt_late = gt.copy()
    gt_late[-1, 0:2, 0:2] = 3
    results = evaluate_results([("a", gt, pred, [1, 2]),
                                ("b", gt_late, gt_late, [1, 3], {3: t - 1})])
    assert results["num_objects"] == 4
    assert np.isnan(results["sequences"]["b"]["objects"][3]["J"]["mean"])
    # Overall means skip objects without scored frames: (1 + 0.25 + 1) / 3 for J.
    assert results["J"]["mean"] == pytest.approx((1 + 0.25 + 1) / 3)

    table = format_table(results)
    assert "overall" in table and "a/2" in table and "b" in table

    out = tmp_path / "eval"
    write_results(results, out)
    import csv
    import json
    data = json.loads((out / "results.json").read_text())  # strict JSON: NaN became null
    assert data["sequences"]["b"]["objects"]["3"]["J"]["mean"] is None
    assert data["J&F"] == pytest.approx(results["J&F"])
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [(r["sequence"], r["object"]) for r in rows] == [("a", "1"), ("a", "2"), ("b", "1"),
                                                           ("b", "3"), ("overall", "")]
    assert float(rows[1]["J_mean"]) == pytest.approx(0.25)
    assert float(rows[-1]["J&F"]) == pytest.approx(results["J&F"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
