"""The gate report (evaluation/gate_report.py, its command line tools/gate_report.py) on hand-made result
folders whose numbers are known."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from evaluation import gate_report
from evaluation.results import write_timeline
from lib.image_io import write_label_png
from tools import gate_report as gate_report_tool

FRAMES = ["00000", "00001", "00002", "00003"]


def box(rows: slice, cols: slice, label: int, into: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((10, 10), np.uint8) if into is None else into.copy()
    out[rows, cols] = label
    return out


def ground_truth() -> list[np.ndarray]:
    """Object 1 holds still on frames 0-2, then moves by 2 columns (IoU 8/24 with frame 2);
    object 2 enters on frame 1 and holds still."""
    gt = [box(slice(0, 4), slice(0, 4), 1)] * 3 + [box(slice(0, 4), slice(2, 6), 1)]
    return [g if t == 0 else box(slice(6, 10), slice(6, 10), 2, g) for t, g in enumerate(gt)]


@pytest.fixture
def folders(tmp_path):
    gt = ground_truth()
    gated = [gt[0], gt[1],
             box(slice(6, 8), slice(6, 10), 2, box(slice(0, 4), slice(0, 4), 1)),  # object 2: J 8/16
             box(slice(6, 10), slice(6, 10), 2, box(slice(0, 4), slice(0, 4), 1))]  # object 1 stayed: J 8/24
    timeline = [{"frame": "00000", "reused": {}},
                {"frame": "00001", "reused": {1: True}, "reuse_prob": {1: 0.8}},
                {"frame": "00002", "reused": {1: False, 2: True}, "reuse_prob": {1: 0.6, 2: 0.9}},
                {"frame": "00003", "reused": {1: False, 2: False}, "reuse_prob": {1: 0.2, 2: 0.5}}]
    for name, masks in (("annotations", gt), ("gated", gated), ("plain", gt)):
        (tmp_path / name / "seq").mkdir(parents=True)
        for frame, mask in zip(FRAMES, masks):
            write_label_png(tmp_path / name / "seq" / f"{frame}.png", mask)
    write_timeline(tmp_path / "gated" / "seq" / "timeline.json", 10.0, timeline)
    return tmp_path, timeline


def test_object_frames_and_summary(folders):
    root, _ = folders
    rows = gate_report.object_frames(root / "gated", root / "plain", root / "annotations")
    assert [(r.frame, r.object_id, r.reused, r.moving) for r in rows] == [
        ("00001", 1, True, False), ("00002", 1, False, False), ("00002", 2, True, False),
        ("00003", 1, False, True), ("00003", 2, False, False)]
    assert rows[3].motion_iou == pytest.approx(8 / 24)
    assert [r.j_gated for r in rows] == pytest.approx([1.0, 1.0, 0.5, 8 / 24, 1.0])
    assert all(r.j_plain == 1.0 for r in rows)
    s = gate_report.summarize(rows)
    assert (s.object_frames, s.still, s.moving, s.reused_still, s.reused_moving) == (5, 4, 1, 2, 0)
    assert s.auc == 1.0  # every still object-frame has a higher reuse probability than the moving one
    assert (s.reused_j_gated, s.reused_j_plain) == pytest.approx((0.75, 1.0))
    assert (s.computed_j_gated, s.computed_j_plain) == pytest.approx(((2 + 8 / 24) / 3, 1.0))
    text = gate_report.format_summary(s)
    assert "reused 2 of 4 (50.0%) still object-frames and 0 of 1 (0.0%) moving" in text
    assert "AUC 1.00" in text and "J 75.0, the same frames computed at TH 1.0: J 100.0" in text
    never = gate_report.summarize([dataclasses.replace(r, reused=False) for r in rows])
    assert (never.reused_still, never.reused_moving) == (0, 0) and math.isnan(never.reused_j_gated)
    assert "no object-frame was reused" in gate_report.format_summary(never)


def test_auc_counts_ties_half_and_needs_both_kinds():
    assert gate_report.rank_auc([0.5], [0.5]) == 0.5
    assert gate_report.rank_auc([0.1, 0.9], [0.5]) == 0.5
    assert gate_report.rank_auc([0.1], [0.9]) == 0.0
    assert gate_report.rank_auc([], [0.9]) is None


def test_timelines_without_probabilities_give_no_auc(folders):
    root, timeline = folders
    write_timeline(root / "gated" / "seq" / "timeline.json", 10.0,
                   [{k: v for k, v in f.items() if k != "reuse_prob"} for f in timeline])
    s = gate_report.gate_report(root / "gated", root / "plain", root / "annotations")
    assert s.auc is None and s.object_frames == 5
    assert "AUC" not in gate_report.format_summary(s)


def test_cli_writes_json_and_names_missing_inputs(folders, capsys):
    root, _ = folders
    parser = gate_report_tool.get_parser()
    out = root / "report.json"
    gate_report_tool.main(parser.parse_args(["--gated", str(root / "gated"), "--plain", str(root / "plain"),
                                             "--annotations", str(root / "annotations"), "--json", str(out)]))
    assert json.loads(out.read_text())["reused_still"] == 2
    assert "still object-frames" in capsys.readouterr().out
    (root / "annotations" / "seq" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match="--annotations.*00002.png"):
        gate_report.gate_report(root / "gated", root / "plain", root / "annotations")
    with pytest.raises(FileNotFoundError, match="results folder not found"):
        gate_report.gate_report(root / "nowhere", root / "plain", root / "annotations")
    with pytest.raises(ValueError, match="no <sequence>/timeline.json"):
        gate_report.gate_report(root / "annotations", root / "plain", root / "annotations")


def test_unusable_json_path_is_one_error_line(folders, blocked, monkeypatch, capsys):
    from conftest import assert_output_error, run_script

    root, _ = folders
    argv = ["--gated", root / "gated", "--plain", root / "plain", "--annotations", root / "annotations",
            "--json", blocked / "report.json"]
    code, err = run_script(monkeypatch, capsys, gate_report_tool.main, gate_report_tool.get_parser(), argv)
    assert_output_error(code, err, blocker=blocked)
