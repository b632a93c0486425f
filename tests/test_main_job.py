"""The offline main job (`bash scripts/demo.sh` = `python demo.py`, run by main_job.py): it runs
end to end on tiny data, prints TH 1.0 and the gate's TH side by side with its goals, and its
timing decides as evaluate.py does."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from evaluation.job import EvalConfig


def test_main_job_runs_offline(tmp_path, capsys, monkeypatch):
    """`bash scripts/demo.sh` is `python demo.py`: here with one epoch on tiny data. It prints TH 1.0
    and TH 0.7 side by side and the goal lines."""
    import demo
    import main_job

    monkeypatch.setattr(main_job, "JOB_SIZE", (64, 112))
    monkeypatch.setattr(main_job, "JOB_TRAIN", {"sequences": 2, "frames": 8, "hold": (0.6, 1.0)})
    monkeypatch.setattr(main_job, "JOB_VAL", {"sequences": 1, "frames": 11, "enter_at": 4})
    monkeypatch.setattr(main_job, "JOB_TRAIN_OPTIONS", {"batch_size": 2, "samples_per_epoch": 2, "num_aug": 1})
    import torch

    import evaluation.run
    import trainers.trainer
    seen_threads, seen_configs = [], []
    for module, name in ((trainers.trainer, "run_training"), (evaluation.run, "evaluate")):
        monkeypatch.setattr(module, name, lambda config, run=getattr(module, name):
                            seen_threads.append(torch.get_num_threads()) or seen_configs.append(config) or run(config))
    threads = torch.get_num_threads()
    job_threads = 1 if threads != 1 else 2  # differs from the test's own count
    out = demo.main(demo.main_job_parser().parse_args(["--work", str(tmp_path), "--epochs", "1", "--dev", "cpu",
                                                  "--threads", str(job_threads), "--batch-sequences", "2"]))
    assert seen_threads == [job_threads] * 3  # --threads reaches the training and both evaluations
    assert [c.batch_sequences for c in seen_configs[1:]] == [2, 2]  # and --batch-sequences both evaluations
    assert torch.get_num_threads() == threads  # and is undone afterwards
    printed = capsys.readouterr().out
    assert f"{job_threads} CPU threads" in printed
    assert re.search(r"TH 1\.0 \(always compute\) +TH 0\.7 \(reuse gate\)", printed)
    for row in ("J&F", "FPS", "reuse rate"):
        assert re.search(rf"^{row} +[\d.]+%? +[\d.]+%?$", printed, flags=re.M), row
    assert re.search(r"^reuse rate +0\.0% +[\d.]+%$", printed, flags=re.M)  # TH 1.0 never reuses
    goals = re.findall(r"^  \[(met|NOT met)\] (.*)$", printed, flags=re.M)
    assert [g[1].split(":")[0] for g in goals] == ["reuse rate at TH 0.7 >= 20%",
                                                    "J&F at TH 0.7 within 3 points of TH 1.0",
                                                    "FPS at TH 0.7 above TH 1.0"]
    assert [g[0] == "met" for g in goals] == [met for _, met in out["goals"]]
    assert "random backbone" in printed and "not the paper's results" in printed
    plain, gated = out["results_plain"], out["results"]
    assert plain["threshold"] == 1.0 and gated["threshold"] == 0.7 and plain["reuse_rate"] == 0.0
    for results in (plain, gated):
        assert 0.0 <= results["J&F"] <= 1.0 and results["fps"] > 0
        assert (Path(results["results_dir"]) / "results.json").is_file()
        assert results["num_aug"] == 5  # demo.py's --num-aug default reaches the job's evaluation
    # The validation video's second object enters at frame 4 (YouTube-VOS layout); every frame is
    # annotated, so J&F scores each object on all its frames but its first and the video's last.
    objects = gated["sequences"]["ytvos-own-0"]["objects"]
    assert (objects["1"]["num_frames"], objects["2"]["num_frames"]) == (11 - 2, 11 - 4 - 2)
    # The gate report covers every tracked object-frame of the TH 0.7 run and agrees with its counts.
    gate = out["gate"]
    assert gate.object_frames == gated["tracked_object_frames"] == gate.still + gate.moving
    assert gate.reused_still + gate.reused_moving == gated["reused_object_frames"]
    assert "the gate at TH 0.7" in printed and "still object-frames" in printed
    for seq, paths in out["overlays"].items():
        assert any(p.endswith("overlay.gif") for p in paths) and any(p.endswith("timeline.png") for p in paths)
    # The timing runs track the same checkpoint with the same decisions as the evaluations.
    speed = out["speed"]
    assert set(speed) == {1.0, 0.7}
    for th, results in ((1.0, plain), (0.7, gated)):
        assert len(speed[th]["fps_runs"]) == main_job.JOB_TIMING_RUNS and speed[th]["reuse_rate"] == results["reuse_rate"]
        assert speed[th]["fps"] == sorted(speed[th]["fps_runs"])[main_job.JOB_TIMING_RUNS // 2]
    fps_goal = f"{speed[0.7]['fps']:.1f} vs {speed[1.0]['fps']:.1f}"
    assert fps_goal in goals[2][1] and re.search(r"^FPS: .* median of 3 runs that alternated", printed, flags=re.M)
    # After one epoch the gate reuses nothing at TH 0.7; at a threshold where it reuses, the timing
    # runs still decide as evaluate.py does.
    low = EvalConfig(model=out["checkpoint"], dset="ytvos-layout", data_root=tmp_path / "synthetic-val",
                                    output_root=tmp_path / "low", TH=0.05, backbone_weights="random", dev="cpu")
    reference = evaluation.run.evaluate(low)
    timed = main_job.time_thresholds(low, (1.0, 0.05), 2)
    assert 0 < reference["reuse_rate"] == timed[0.05]["reuse_rate"] and timed[1.0]["reuse_rate"] == 0


def test_main_job_threads_default():
    """The main job runs on 2 threads unless told otherwise (docs/main-job.md's report was made so)."""
    import demo
    import main_job

    assert demo.get_parser([]).parse_args([]).threads == main_job.JOB_THREADS == 2
    with pytest.raises(SystemExit):
        demo.get_parser([]).parse_args(["--threads", "0"])


def test_main_job_goals():
    import main_job

    def results(th, jf, fps, reuse):
        return {"threshold": th, "J&F": jf, "J": {"mean": jf}, "F": {"mean": jf}, "fps": fps, "reuse_rate": reuse}

    def speed(plain_fps, gated_fps):
        return {1.0: {"fps": plain_fps, "fps_runs": [plain_fps]}, 0.7: {"fps": gated_fps, "fps_runs": [gated_fps]}}

    plain = results(1.0, 0.60, 20.0, 0.0)
    faster, slower = speed(20.0, 25.0), speed(20.0, 19.0)
    assert [met for _, met in main_job.main_job_goals(plain, results(0.7, 0.58, 25.0, 0.45), faster)] == [True] * 3
    assert [met for _, met in main_job.main_job_goals(plain, results(0.7, 0.56, 19.0, 0.15), slower)] == [False] * 3
    # The FPS goal and the table take the alternating timing runs, not evaluate.py's single runs.
    goals = main_job.main_job_goals(plain, results(0.7, 0.58, 25.0, 0.45), slower)
    assert [met for _, met in goals] == [True, True, False] and "19.0 vs 20.0 (0.95x)" in goals[2][0]
    table = main_job.side_by_side(plain, results(0.7, 0.58, 25.0, 0.45), speed(31.0, 33.0))
    assert re.search(r"^J&F +60\.0 +58\.0$", table, flags=re.M)
    assert re.search(r"^FPS +31\.0 +33\.0$", table, flags=re.M)
    assert re.search(r"^reuse rate +0\.0% +45\.0%$", table, flags=re.M)


def test_unusable_work_folder_is_one_error_line(blocked, monkeypatch, capsys):
    import demo
    from conftest import assert_output_error, run_script

    code, err = run_script(monkeypatch, capsys, demo.main, demo.main_job_parser(),
                           ["--work", blocked / "w", "--epochs", "1", "--dev", "cpu"])
    assert_output_error(code, err, blocker=blocked)
    assert "--work" in err
