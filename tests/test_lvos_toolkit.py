"""LVOS scored as lvos-evaluation scores it today (https://github.com/LingyiHongfd/lvos-evaluation,
commit c05e889 "update code for v2"): per-object J, F, V and the seen/unseen headline on a
synthetic LVOS set in the real layout (dataset.synthetic_layouts.make_lvos_scoring_set: objects
that start and end mid-video, one whose frame_nums exceeds its frames, one absent on its scored
frames, one video on the unseen list), with its meta frame ranges as strings (v1 style) and as
integers (v2 style), scored with `evaluate.py --score` (no model).

EXPECTED holds the numbers lvos-evaluation c05e889 printed for this set (semi-supervised task,
single process, numpy 1.26.4, its Python boundary code: the optional Cython extension was not
built), run once on 2026-12-03, identical for both meta styles. (With its Cython extension
built, the toolkit's F differs: 0.5429 overall instead of 0.6040; see README, LVOS protocol.)
"""
from __future__ import annotations

import csv
import json

import pytest

from dataset.synthetic_layouts import make_lvos_scoring_set
from evaluate import get_parser, main

# object name as the toolkit prints it (<video>_<index from 1>) -> (J-Mean, F-Mean, V-Mean)
EXPECTED_OBJECTS = {
    ("R3UJGYwy", "1"): (0.7183098591549296, 0.8029582673005811, 0.0),
    ("R3UJGYwy", "2"): (0.6440281030444965, 0.5293314977231998, 0.18027756377319948),
    ("synthsn0", "1"): (0.678808550373511, 0.5822164610178299, 0.25826343140289915),
    ("synthsn0", "2"): (0.639751552795031, 0.7097391516333496, 0.09219544457292887),
    ("synthsn0", "3"): (0.3333333333333333, 0.3333333333333333, 0.471380949975707),
}
EXPECTED_GLOBAL = {"J&F": 0.6099269977767665, "J": 0.615900063300169, "F": 0.603953932253364,
                   "V": 0.1820426952685557}
EXPECTED_GROUPS = {"seen": (0.550631, 0.541763, 0.273947), "unseen": (0.681169, 0.666145, 0.090139)}  # 6 digits


@pytest.mark.parametrize("meta", ["v1", "v2"])
def test_lvos_scores_equal_the_toolkit(tmp_path, meta):
    make_lvos_scoring_set(tmp_path / "lvos", tmp_path / "theirs", meta)
    results = main(get_parser().parse_args(["--dset", "lvos-val", "--lvos-root", str(tmp_path / "lvos"),
                                            "--score", str(tmp_path / "theirs")]))
    for (video, obj), (j, f, v) in EXPECTED_OBJECTS.items():
        scores = results["sequences"][video]["objects"][obj]
        assert (scores["J"]["mean"], scores["F"]["mean"], scores["V"]) == pytest.approx((j, f, v), abs=1e-12)
        assert scores["J"]["decay"] is None and scores["F"]["decay"] is None
    assert results["J&F"] == pytest.approx(EXPECTED_GLOBAL["J&F"], abs=1e-12)
    assert results["J"]["mean"] == pytest.approx(EXPECTED_GLOBAL["J"], abs=1e-12)
    assert results["F"]["mean"] == pytest.approx(EXPECTED_GLOBAL["F"], abs=1e-12)
    assert results["V"] == pytest.approx(EXPECTED_GLOBAL["V"], abs=1e-12)
    for group, (j, f, v) in EXPECTED_GROUPS.items():
        assert (results[group]["J"]["mean"], results[group]["F"]["mean"], results[group]["V"]) == \
            pytest.approx((j, f, v), abs=5e-7)
    assert results["unseen"]["videos"] == ["R3UJGYwy"]
    # what the results files say
    written = json.loads((tmp_path / "theirs" / "results.json").read_text())
    assert written["J&F"] == pytest.approx(EXPECTED_GLOBAL["J&F"], abs=1e-12) and "decay" in written
    rows = {(r["sequence"], r["object"]): r for r in csv.DictReader((tmp_path / "theirs" / "results.csv").open())}
    assert float(rows[("synthsn0", "3")]["V"]) == pytest.approx(EXPECTED_OBJECTS[("synthsn0", "3")][2], abs=1e-12)
    assert rows[("synthsn0", "3")]["J_decay"] == ""
