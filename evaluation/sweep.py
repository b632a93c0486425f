"""The accuracy / speed / FLOPs trade-off over reuse thresholds in one run (`evaluate.py --TH 1.0,0.9,...`).

    1. results   each threshold evaluated as a single-threshold run would be (its own results
                 directory, PNGs, results.json), the frames decoded once for all thresholds
    2. timing    the thresholds tracked in turn, --timing-runs times (no writing): FPS as medians,
                 so that the drift of a shared machine hits every threshold alike
    3. FLOPs     exact per-path counts (models.flops) times the decisions each threshold took
    4. curve     rank 0 writes curve.csv, curve.json and curve.png into
                 <output root>/result/<dset>-<model stem>_curve[_fast]/

Under torchrun every rank tracks its share of the sequences in every step.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from evaluation import job as ev
from evaluation.report import FPS_DEFINITION, WALL_FPS_DEFINITION, collect_results, report
from evaluation.results import (TrackingStats, curve_dir_name, load_timeline, model_stem, percent, rate,
                                results_dir_name)
from evaluation.tracking import exchange_outcomes, track_sequence, track_sequences
from evaluation.visuals import save_curve_png
from lib import distributed
from lib.background import read_ahead
from lib.fileio import atomic_write_bytes, make_dirs
from lib.metrics import json_safe

CURVE_COLUMNS = ("tau", "J&F", "J", "F", "reuse_rate", "fps", "wall_fps", "gflops_per_frame", "frames",
                 "timing_runs", "results_dir")
MEMORY_SHARE = 0.5  # frames are held in memory when they take at most this share of the free memory
TIMING_FPS_DEFINITION = ("median over the timing runs, which track every threshold in turn, of frames / tracker "
                         "time (as evaluate.py's FPS: object initialization included, frames from memory or "
                         "decoded ahead in a thread, no PNG writing)")
TIMING_WALL_FPS_DEFINITION = ("median over the timing runs of frames / wall time of the run (tracking and "
                              "feeding the frames; no PNG writing); over several ranks the longest rank's time")
GFLOPS_DEFINITION = ("mean GFLOPs per frame: torch.utils.flop_counter's count of each path (low backbone per "
                     "frame, high backbone when an object computes or starts, gate per gated object, computed or "
                     "reused decoder per object) times the decisions taken; object initialization and "
                     "target-model updates not counted; not counted for an exported folder (the same network: "
                     "sweep its checkpoint)")


# ---------------------------------------------------------------------------------------------
# Frames, decoded once


def frame_bytes(sequences: Sequence) -> int:
    """Bytes the decoded RGB frames of `sequences` take."""
    return sum(len(seq) * seq.size[0] * seq.size[1] * 3 for seq in sequences)


def free_memory() -> int:
    """Bytes of memory available now (0 where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def frames_in_memory(sequences: Sequence, budget: int) -> dict[str, list]:
    """{name: decoded frames} of every sequence when they fit in `budget` bytes, else {} (each
    pass then reads them again, decoded ahead by lib.background.read_ahead)."""
    if frame_bytes(sequences) > budget:
        return {}
    return {seq.name: list(read_ahead(seq)) for seq in sequences}


# ---------------------------------------------------------------------------------------------
# Timing runs


def decisions(timeline: Sequence[Mapping]) -> tuple:
    """The reuse decisions of a timeline (per frame, (object id, reused) pairs), comparable."""
    return tuple(tuple(sorted((int(k), bool(v)) for k, v in f["reused"].items())) for f in timeline)


def timed_runs(tracker, videos: Mapping[str, object], thresholds: Sequence[float], runs: int) -> dict[float, dict]:
    """Track `videos` ({name: frames in memory, or a dataset.Sequence read again each time}) at
    each threshold in turn, `runs` times, after an untimed warm-up. -> {threshold: {"frames",
    "seconds": [tracker seconds per run], "wall_seconds": [per run], "reused", "tracked",
    "decisions": {name: decisions() of the first run}, "stable": every run decided alike}}."""
    def frames_of(video):
        return video if isinstance(video, list) else read_ahead(video)

    first = next(iter(videos.values()), None)
    if first is not None:
        warm = first[:2] if isinstance(first, list) else [first[i] for i in range(min(2, len(first)))]
        for th in thresholds:  # first calls allocate and pick kernels
            for _ in tracker.track(warm, th, keep_probabilities=False):
                pass
    timing = {th: {"frames": 0, "seconds": [], "wall_seconds": [], "reused": 0, "tracked": 0, "decisions": {},
                   "stable": True} for th in thresholds}
    for run in range(runs):
        for th in thresholds:
            entry, stats = timing[th], TrackingStats()
            started = time.perf_counter()
            for name, video in videos.items():
                before = stats.frames
                for _ in track_sequence(tracker, frames_of(video), th, stats):
                    pass
                taken = decisions(stats.timeline[before:])
                if run == 0:
                    entry["decisions"][name] = taken
                elif entry["decisions"][name] != taken:
                    entry["stable"] = False
            entry["wall_seconds"].append(time.perf_counter() - started)
            entry["seconds"].append(stats.seconds)
            entry["frames"], entry["reused"], entry["tracked"] = stats.frames, stats.reused, stats.tracked
    return timing


def combine_timings(per_rank: Sequence[Mapping[float, dict]], thresholds: Sequence[float]) -> dict[float, dict]:
    """Every rank's timed_runs -> {threshold: {"fps", "wall_fps" (medians), "fps_runs",
    "wall_fps_runs", "reuse_rate"}}: per run all frames / all tracker seconds, and all frames /
    the longest rank's wall time."""
    combined = {}
    for th in thresholds:
        entries = [r[th] for r in per_rank]
        frames = sum(e["frames"] for e in entries)
        runs = len(entries[0]["seconds"])
        fps = [rate(frames, sum(e["seconds"][i] for e in entries)) for i in range(runs)]
        wall = [rate(frames, max(e["wall_seconds"][i] for e in entries)) for i in range(runs)]
        tracked = sum(e["tracked"] for e in entries)
        combined[th] = {"fps": statistics.median(fps) if fps else math.nan, "fps_runs": fps,
                        "wall_fps": statistics.median(wall) if wall else math.nan, "wall_fps_runs": wall,
                        "reuse_rate": sum(e["reused"] for e in entries) / tracked if tracked else math.nan,
                        "frames": frames}
    return combined


# ---------------------------------------------------------------------------------------------
# FLOPs


def sequence_flops(tracker, results_directory: Path, sequences: Sequence, cache: dict) -> tuple[int, int]:
    """(FLOPs, frames) of the sequences' decisions as written in their timeline.json; `cache`
    holds models.flops.path_flops per frame size."""
    from models.flops import path_flops, timeline_flops

    total = frames = 0
    for seq in sequences:
        if seq.size not in cache:
            cache[seq.size] = path_flops(tracker, seq.size)
        timeline = _timeline(results_directory, seq.name)
        total += timeline_flops(cache[seq.size], timeline, set(seq.start_frames.values()))
        frames += len(timeline)
    return total, frames


# ---------------------------------------------------------------------------------------------
# The curve


def curve_row(th: float, results: Mapping, speed: Optional[Mapping], gflops: float, runs: int) -> dict:
    """One row of curve.csv: the threshold's results.json, its timing (None: the results run's
    own FPS) and GFLOPs per frame."""
    def measure(name):
        value = results.get(name)
        return value.get("mean") if isinstance(value, Mapping) else value
    return {"tau": float(th), "J&F": results.get("J&F"), "J": measure("J"), "F": measure("F"),
            "reuse_rate": results.get("reuse_rate"),
            "fps": speed["fps"] if speed else results.get("fps"),
            "wall_fps": speed["wall_fps"] if speed else results.get("wall_fps"),
            "gflops_per_frame": gflops, "frames": results.get("frames"), "timing_runs": runs if speed else 0,
            "results_dir": results.get("results_dir")}


def write_curve(out_dir: Path, rows: Sequence[Mapping], info: Mapping) -> None:
    """curve.csv (CURVE_COLUMNS, empty cells for missing numbers) and curve.json ({"rows", ...info})."""
    make_dirs(out_dir, "the curve's folder")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None or (isinstance(row[c], float) and math.isnan(row[c])) else row[c]
                         for c in CURVE_COLUMNS])
    atomic_write_bytes(out_dir / "curve.csv", buffer.getvalue().encode())
    text = json.dumps(json_safe({"rows": list(rows), **info}), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out_dir / "curve.json", text.encode())


def read_curve(path: Path) -> list[dict]:
    """The rows of a curve.csv (a file, or a folder holding one) as dicts of floats (None for
    empty cells; results_dir a string)."""
    path = Path(path)
    csv_path = path / "curve.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise FileNotFoundError(f"no curve.csv in {path} (run evaluate.py with several thresholds, "
                                f"e.g. --TH 1.0,0.8,0.6, to make one)")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("tau", "J&F", "fps", "gflops_per_frame", "reuse_rate") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} is not a curve.csv: no column {', '.join(missing)}")
        return [{k: (v if k == "results_dir" else (float(v) if v != "" else None)) for k, v in row.items()}
                for row in reader]


def format_curve(rows: Sequence[Mapping]) -> str:
    """The curve as a console table."""
    def pct(v):
        return percent(v, sign=False)

    def num(v, digits=1):
        return "n/a" if v is None or math.isnan(v) else f"{v:.{digits}f}"
    header = ("tau", "J&F", "J", "F", "reuse %", "FPS", "wall FPS", "GFLOPs/frame")
    lines = [header] + [(repr(float(r['tau'])), pct(r["J&F"]), pct(r["J"]), pct(r["F"]), pct(r["reuse_rate"]),
                         num(r["fps"]), num(r["wall_fps"]), num(r["gflops_per_frame"], 2)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


# ---------------------------------------------------------------------------------------------
# The sweep


def for_threshold(job, th: float):
    """`job` (evaluation.job.Job) as a single-threshold run at `th` would prepare it."""
    config = dataclasses.replace(job.config, TH=float(th))
    out_dir = job.out_dir.parent / results_dir_name(config.dset, job.checkpoint, th, config.fast)
    return dataclasses.replace(job, config=config, out_dir=out_dir, settings={**job.settings, "threshold": float(th)})


def _finished(job, todo: list[str]) -> Optional[dict]:
    """With --resume, a threshold whose every sequence is finished: its results.json, if it
    covers the same sequences (else None: collect again)."""
    path = job.out_dir / "results.json"
    if todo or not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("sequences_requested") == [s.name for s in job.data.sequences] else None


def sweep(config, ctx: distributed.Context, device, device_text: str, open_exported=None) -> dict:
    """An evaluation with several thresholds (config, an evaluation.job.EvalConfig: TH a tuple): see the module's docstring.
    Returns {"thresholds": {th: results dict}, "rows": curve rows, "curve_dir"} on rank 0,
    {} elsewhere. `open_exported`: as for evaluation.run.evaluate (an exported folder's tracker)."""
    thresholds = [float(th) for th in config.TH]
    base = ev.prepare(dataclasses.replace(config, TH=thresholds[0]), ctx, device, device_text)
    jobs = {th: for_threshold(base, th) for th in thresholds}
    out_dir = base.out_dir.parent / curve_dir_name(config.dset, base.checkpoint, base.config.fast)
    try:
        if ctx.is_main:
            ev.announce(base)
            print(f"thresholds: {', '.join(map(repr, thresholds))}; curve: {out_dir}")
        tracker = ev.job_tracker(base, open_exported)
        mine = ev.my_share(base, [seq.name for seq in base.data.sequences])
        budget = int(MEMORY_SHARE * free_memory() / max(1, ctx.local_world_size))
        frames = frames_in_memory(mine, budget)
        if ctx.is_main:
            size = frame_bytes(mine) / 2 ** 30
            print(f"frames: {'decoded once into memory' if frames or not mine else 're-read from disk in every pass'} "
                  f"({size:.2f} GiB{'' if frames or not mine else ' would not fit'})")

        results = {}
        for step, th in enumerate(thresholds, 1):
            job = jobs[th]
            todo = ev.pending(job, config.resume)
            done = _finished(job, todo) if config.resume else None
            if done is not None:
                results[th] = done
                if ctx.is_main:
                    print(f"[{step}/{len(thresholds)}] TH {th!r}: finished before, skipped (--resume): {job.out_dir}")
                continue
            if ctx.is_main:
                print(f"[{step}/{len(thresholds)}] TH {th!r}: {len(todo)} sequence(s) -> {job.out_dir}")
            outcomes = exchange_outcomes(job, track_sequences(job, ev.my_share(job, todo), tracker, frames))
            if ctx.is_main:
                results[th] = collect_results(job, outcomes, todo)
                report(results[th])

        speed = None
        if config.timing_runs:
            if ctx.is_main:
                print(f"timing: TH {', '.join(map(repr, thresholds))} in turn, {config.timing_runs} run(s) each "
                      f"(FPS: the median run)")
            videos = {seq.name: frames.get(seq.name, seq) for seq in mine}
            timing = timed_runs(tracker, videos, thresholds, config.timing_runs)
            for th in thresholds:  # the timed runs must decide as the results runs did
                entry = timing[th]
                entry["matches_results"] = entry["stable"] and all(
                    entry["decisions"][seq.name] == decisions(_timeline(jobs[th].out_dir, seq.name))
                    for seq in mine)
                entry.pop("decisions")
            gathered = distributed.all_gather(ctx, timing)
            speed = combine_timings(gathered, thresholds)
            for th in thresholds:
                speed[th]["matches_results"] = all(g[th]["matches_results"] for g in gathered)

        if not ctx.is_main:
            return {}
        rows, flops_cache, flops = [], {}, {}
        for th in thresholds:  # an exported folder's graphs are not counted (GFLOPS_DEFINITION)
            total, count = (0, 0) if base.exported else sequence_flops(tracker, jobs[th].out_dir, base.data.sequences,
                                                                      flops_cache)
            flops[th] = total / count / 1e9 if count else math.nan
            rows.append(curve_row(th, results[th], speed[th] if speed else None, flops[th], config.timing_runs))
        info = {"dset": config.dset, "checkpoint": str(base.checkpoint), "device": str(device),
                "device_description": device_text, "world_size": ctx.world_size, "timing_runs": config.timing_runs,
                "timing": {str(th): speed[th] for th in thresholds} if speed else None,
                "path_flops": {f"{h}x{w}": paths for (h, w), paths in flops_cache.items()},
                "fps_definition": TIMING_FPS_DEFINITION if speed else FPS_DEFINITION,
                "wall_fps_definition": TIMING_WALL_FPS_DEFINITION if speed else WALL_FPS_DEFINITION,
                "gflops_definition": GFLOPS_DEFINITION, "command": [sys.executable] + sys.argv}
        write_curve(out_dir, rows, info)
        wrote = [out_dir / "curve.csv", out_dir / "curve.json"]
        if any(r["J&F"] is not None for r in rows):
            save_curve_png(out_dir / "curve.png", [(model_stem(base.checkpoint), rows)],
                           title=f"{config.dset}: J&F against speed and FLOPs over the reuse threshold")
            wrote.append(out_dir / "curve.png")
        print("\n" + format_curve(rows))
        if speed and not all(speed[th]["matches_results"] for th in thresholds):
            print("warning: the timing runs did not take the results runs' reuse decisions at every threshold "
                  "(nondeterministic kernels?); the FPS columns time slightly different work")
        print(f"wrote {', '.join(map(str, wrote))}")
        return {"thresholds": results, "rows": rows, "curve_dir": str(out_dir), "timing": speed}
    finally:
        distributed.leave_together(ctx)


def _timeline(results_directory: Path, name: str) -> list:
    return load_timeline(Path(results_directory) / name / "timeline.json")["frames"]
