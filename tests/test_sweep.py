"""evaluate.py --TH with several thresholds (evaluation.sweep): each row equals a separate single-threshold
run, the timing runs decide as the results runs, --resume skips finished thresholds, the FLOPs
follow the decisions, and `visualize.py curve` overlays finished sweeps.

Small for 2 CPU cores: the reduced DAVIS sample of test_evaluate (2 sequences of 6 frames,
120x216), --num-aug 1, a random ResNet-18 checkpoint whose gate reuses at TH 0.5.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import visualize
from evaluate import get_parser
from evaluation import sweep as sweep_module
from evaluation.results import load_timeline
from lib.cli import UsageError
from models import build_tracker
from models.flops import frame_flops, path_flops
from tests.test_evaluate import _clean_env, _one_thread, checkpoint, davis_root, run  # noqa: F401 (fixtures)

THRESHOLDS = (1.0, 0.5)


def sweep_args(davis_root, *extra):
    return ["--dset", "dv2017val", "--davis-root", str(davis_root), "--TH", "1.0,0.5", *extra]


@pytest.fixture(scope="module")
def swept(checkpoint, davis_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, run(checkpoint, out, *sweep_args(davis_root, "--timing-runs", "2"))


@pytest.fixture(scope="module")
def singles(checkpoint, davis_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("singles")
    return {th: run(checkpoint, out, "--dset", "dv2017val", "--davis-root", str(davis_root), "--TH", str(th))
            for th in THRESHOLDS}


def test_threshold_list_parses():
    parser = get_parser()
    assert parser.parse_args(["--TH", "1.0,0.9, 0.6"]).TH == (1.0, 0.9, 0.6)
    assert parser.parse_args(["--TH", "0.8"]).TH == 0.8
    for bad in ("0.7,0.7", "0.7,1.5", ","):
        with pytest.raises(SystemExit):
            parser.parse_args(["--TH", bad])
    with pytest.raises(SystemExit):
        parser.parse_args(["--timing-runs", "-1"])


def test_rows_equal_single_runs(swept, singles):
    out, result = swept
    curve_dir = out / "result" / "dv2017val-rn18_curve_fast"
    assert result["curve_dir"] == str(curve_dir)
    with open(curve_dir / "curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["tau"]) for r in rows] == list(THRESHOLDS)
    for row, th in zip(rows, THRESHOLDS):
        single = singles[th]
        assert float(row["J&F"]) == single["J&F"]  # exactly
        assert float(row["J"]) == single["J"]["mean"] and float(row["F"]) == single["F"]["mean"]
        assert float(row["reuse_rate"]) == single["reuse_rate"]
        assert int(row["timing_runs"]) == 2
        # The same masks as the single run, in a results directory of the same name.
        swept_dir, single_dir = Path(row["results_dir"]), Path(single["results_dir"])
        assert swept_dir.name == single_dir.name and swept_dir.parent.parent == out
        pngs = sorted(p.relative_to(single_dir) for p in single_dir.glob("*/*.png"))
        assert pngs and pngs == sorted(p.relative_to(swept_dir) for p in swept_dir.glob("*/*.png"))
        for p in pngs:
            assert np.array_equal(np.array(Image.open(swept_dir / p)), np.array(Image.open(single_dir / p))), p
    assert float(rows[0]["reuse_rate"]) == 0 and float(rows[1]["reuse_rate"]) > 0  # both paths taken at 0.5
    with Image.open(curve_dir / "curve.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1] > 600


def test_timing_runs_alternate_and_decide_as_the_results_runs(swept):
    _, result = swept
    for th in THRESHOLDS:
        timing = result["timing"][th]
        assert timing["matches_results"] is True
        assert len(timing["fps_runs"]) == len(timing["wall_fps_runs"]) == 2
        assert timing["fps"] == float(np.median(timing["fps_runs"])) > 0
        assert timing["frames"] == 12
        row = next(r for r in result["rows"] if r["tau"] == th)
        assert row["fps"] == timing["fps"] and row["wall_fps"] == timing["wall_fps"]
        assert timing["reuse_rate"] == row["reuse_rate"]


def test_timed_runs_order_and_changed_decisions():
    """timed_runs tracks the thresholds in turn in every run, and flags a run that decides otherwise."""
    calls = []

    class Tracker:
        def track(self, frames, th, keep_probabilities):
            frames = list(frames)
            calls.append((th, len(frames)))
            flip = th == 0.5 and sum(c[0] == 0.5 for c in calls) == 3  # the second timed run at 0.5
            for _ in frames:
                yield argparse.Namespace(seconds=0.5, reused={1: flip}, reuse_prob={})

    timing = sweep_module.timed_runs(Tracker(), {"a": [0, 1, 2]}, (1.0, 0.5), runs=2)
    assert calls == [(1.0, 2), (0.5, 2), (1.0, 3), (0.5, 3), (1.0, 3), (0.5, 3)]
    assert timing[1.0]["stable"] and not timing[0.5]["stable"]
    assert timing[1.0]["seconds"] == [1.5, 1.5] and timing[1.0]["frames"] == 3
    combined = sweep_module.combine_timings([timing, timing], (1.0, 0.5))
    assert combined[1.0]["fps"] == 2.0 and combined[1.0]["frames"] == 6


def test_flops_follow_the_decisions(checkpoint, swept):
    out, result = swept
    tracker = build_tracker(str(checkpoint), backbone_weights="random", num_aug=1)
    paths = path_flops(tracker, (120, 216))
    whole = FlopCounterMode(display=False)
    with whole, torch.no_grad():
        tracker.backbone(torch.zeros(1, 3, 120, 216, dtype=torch.uint8))
    assert paths["backbone_low"] + paths["backbone_high"] == whole.get_total_flops()
    assert 0 < paths["gate"] < paths["backbone_low"] and paths["computed"] > 0 and paths["reused"] > 0

    low, high, gate, comp, reuse = (paths[k] for k in ("backbone_low", "backbone_high", "gate", "computed", "reused"))
    assert frame_flops(paths, {}, 0, starts=True) == low + high
    assert frame_flops(paths, {1: True, 2: True}, 2, starts=False) == low + 2 * gate + 2 * reuse
    assert frame_flops(paths, {1: True, 2: False}, 2, starts=False) == low + high + 2 * gate + comp + reuse
    # TH 1.0: every frame the whole backbone, every tracked object-frame the computed path, no gate.
    row = result["rows"][0]
    single = result["thresholds"][1.0]
    expected = (12 * (low + high) + single["tracked_object_frames"] * comp) / 12 / 1e9
    assert row["gflops_per_frame"] == pytest.approx(expected, rel=1e-12)
    # TH 0.5: the decisions in the timelines, counted by hand.
    gated = reused = computed = high_frames = 0
    for timeline in Path(result["thresholds"][0.5]["results_dir"]).glob("*/timeline.json"):
        for i, f in enumerate(load_timeline(timeline)["frames"]):
            gated += len(f["reuse_prob"])
            reused += sum(f["reused"].values())
            computed += len(f["reused"]) - sum(f["reused"].values())
            high_frames += i == 0 or not all(f["reused"].values())
    expected = (12 * low + high_frames * high + gated * gate + computed * comp + reused * reuse) / 12 / 1e9
    assert result["rows"][1]["gflops_per_frame"] == pytest.approx(expected, rel=1e-12)


def test_resume_skips_finished_thresholds_and_rereads_frames(checkpoint, davis_root, swept, monkeypatch, capsys):
    out, first = swept
    pngs = {p: p.stat().st_mtime_ns for p in (out / "result").glob("*_fast/*/*.png")}
    monkeypatch.setattr(sweep_module, "MEMORY_SHARE", 0.0)  # frames re-read from disk in every pass
    again = run(checkpoint, out, *sweep_args(davis_root, "--timing-runs", "1", "--resume"))
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped (--resume)") == 2
    assert "re-read from disk" in printed
    assert {p: p.stat().st_mtime_ns for p in pngs} == pngs
    assert [r["J&F"] for r in again["rows"]] == [r["J&F"] for r in first["rows"]]
    assert all(again["timing"][th]["matches_results"] for th in THRESHOLDS)
    info = json.loads((Path(again["curve_dir"]) / "curve.json").read_text())
    assert info["timing_runs"] == 1 and len(info["rows"]) == 2


def test_visualize_curve_overlays_sweeps(swept, tmp_path):
    out, result = swept
    curve_dir = Path(result["curve_dir"])
    parser = visualize.get_parser()
    figure = tmp_path / "both.png"
    written = visualize.main(parser.parse_args(["curve", str(curve_dir), str(curve_dir / "curve.csv"),
                                                "--labels", "a", "b", "--out", str(figure)]))
    assert written == figure
    with Image.open(figure) as im:
        assert im.format == "PNG"
    with pytest.raises(UsageError, match="--labels"):
        visualize.main(parser.parse_args(["curve", str(curve_dir), "--labels", "a", "b"]))
    with pytest.raises(FileNotFoundError, match="no curve.csv"):
        visualize.main(parser.parse_args(["curve", str(tmp_path)]))


def test_demo_main_job_sweeps_a_threshold_list(tmp_path, monkeypatch, capsys):
    """demo.py --TH 0.7,0.5: the main job evaluates and times TH 1.0, 0.7 and 0.5 in one sweep
    (training replaced by a prepared checkpoint, a smaller validation set, one timing run)."""
    import demo
    import main_job
    import trainers.trainer
    from benchmarks.parallel_eval import make_checkpoint

    def fake_training(config):
        (config.checkpoints / "demo").mkdir(parents=True)
        make_checkpoint(config.checkpoints / "demo" / f"demo_ep{config.epochs:04d}.pth")
    monkeypatch.setattr(trainers.trainer, "run_training", fake_training)
    monkeypatch.setattr(main_job, "JOB_VAL", {"sequences": 1, "frames": 8, "enter_at": 3})
    monkeypatch.setattr(main_job, "JOB_TIMING_RUNS", 1)
    out = demo.main(demo.main_job_parser().parse_args(["--work", str(tmp_path), "--epochs", "1", "--dev", "cpu",
                                                  "--TH", "0.7,0.5", "--num-aug", "1", "--threads", "1"]))
    assert set(out["speed"]) == {1.0, 0.7, 0.5} and out["results"]["threshold"] == 0.7
    assert [r["tau"] for r in sweep_module.read_curve(tmp_path / "result" / "ytvos-layout-demo_ep0001_curve_fast")] \
        == [1.0, 0.7, 0.5]
    assert re.search(r"^  \[(met|NOT met)\] reuse rate at TH 0\.7", capsys.readouterr().out, flags=re.M)
    with pytest.raises(SystemExit):  # one threshold with --video
        demo.video_parser().parse_args(["--video", str(tmp_path), "--mask", str(tmp_path), "--model",
                                        str(tmp_path), "--TH", "0.7,0.5"])
