"""An evaluation's results: collected by rank 0 from what the ranks wrote (results.json, results.csv,
the submission zip) and reported on the console."""
from __future__ import annotations

import datetime
from importlib import metadata
import math
import sys
from pathlib import Path

import torch

from evaluation.job import Job, config_arguments
from evaluation.results import (evaluate_data_dir, percent, read_sequence_stats, summarize_tracking, write_json,
                                write_submission_zip)
from lib.metrics import format_table, json_safe, write_results

FPS_DEFINITION = ("frames / tracker time: object initialization (first-frame augmentation and target-model "
                  "training) included, except the first-frame augmentation of each sequence after the first, "
                  "prepared by a thread while the previous one tracks; reading frames "
                  "from disk and writing PNGs excluded; CUDA synchronized "
                  "after every frame. Over several ranks: all frames / the tracker time summed over all ranks "
                  "(the speed of one process)")
WALL_FPS_DEFINITION = ("frames tracked in this run / wall-clock time of the tracking loop (disk reading, PNG "
                       "writing and waiting included); over several ranks: the longest rank's wall time "
                       "(the throughput of the whole run)")
REUSE_DEFINITION = ("reused object-frames / tracked object-frames, an object being tracked in every frame after "
                    "its first; pooled over all sequences of all ranks")


def collect_results(job: Job, outcomes: list[dict], computed: list[str]) -> dict:
    """Rank 0: per-sequence statistics from disk, J&F from the PNGs, overall FPS / wall FPS /
    reuse rate, the metadata block; writes results.json (and results.csv, the zip)."""
    data = job.data
    per_sequence = {seq.name: read_sequence_stats(job.out_dir, seq.name) for seq in data.sequences}
    for stats in per_sequence.values():
        stats.pop("settings", None)
    overall = summarize_tracking(per_sequence, wall_seconds=max((o["wall_seconds"] for o in outcomes), default=0.0),
                                 frames_run=sum(o["frames"] for o in outcomes))

    if data.metric is not None:
        print(f"Computing J&F{' (LVOS protocol)' if data.metric == 'lvos' else ''} from the written PNGs")
        results = evaluate_data_dir(job.out_dir, data)
    else:
        results = {"sequences": {name: {} for name in per_sequence}}
    for name, stats in per_sequence.items():
        results["sequences"][name].update(stats)
    results.update(overall)
    results.update(_metadata(job, computed, outcomes))
    if data.submission_prefix is not None:
        results["submission"] = write_submission_zip(job.out_dir, data.submission_videos,
                                                     prefix=data.submission_prefix)
    results = json_safe(results)
    if data.metric is not None:
        write_results(results, job.out_dir)
    else:
        write_json(job.out_dir / "results.json", results)
    return results


def _metadata(job: Job, computed: list[str], outcomes: list[dict]) -> dict:
    config = job.config
    return {
        "dset": config.dset, "dataset": job.data.name, "data_root": str(job.data.root), "results_dir": str(job.out_dir),
        "metric": job.data.metric, "checkpoint": str(job.checkpoint), "backbone": job.backbone, "gate": job.has_gate,
        "threshold": float(config.TH), "fast": bool(config.fast), "num_aug": config.num_aug, "seed": config.seed,
        "runtime": job.runtime, "precision": job.settings["precision"], **_exported(job),
        "backbone_weights": str(config.backbone_weights), "device": str(job.device),
        "device_description": job.device_text, "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda, "command": [sys.executable] + sys.argv, "args": config_arguments(config),
        "world_size": job.ctx.world_size, "backend": job.ctx.backend,
        "ranks": [{k: o[k] for k in ("rank", "sequences", "frames", "tracker_seconds", "wall_seconds")}
                  for o in outcomes],
        "sequences_requested": [seq.name for seq in job.data.sequences], "sequences_computed": computed,
        "fps_definition": FPS_DEFINITION, "wall_fps_definition": WALL_FPS_DEFINITION,
        "reuse_rate_definition": REUSE_DEFINITION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _exported(job: Job) -> dict:
    """An exported folder's provenance: its checkpoint, export versions and int8 calibration."""
    if job.exported is None:
        return {}
    m = job.exported
    try:
        version = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:  # another build (onnxruntime-gpu, ...)
        version = None
    return {"onnxruntime_version": version,
            "export": {"checkpoint": m["checkpoint"], "opset": m["opset"], "versions": m.get("versions"),
                       "calibration": m.get("calibration")}}


# ---------------------------------------------------------------------------------------------
# Report


def _num(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _speed_table(per_sequence: dict, overall: dict) -> str:
    rows = [(name, str(s["frames"]), _num(s.get("fps")), _num(s.get("wall_fps")), percent(s.get("reuse_rate")))
            for name, s in per_sequence.items()]
    rows.append(("overall", str(overall["frames"]), _num(overall["fps"]), _num(overall.get("wall_fps")),
                 percent(overall["reuse_rate"])))
    header = ("Sequence", "Frames", "FPS", "Wall FPS", "Reuse")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
             for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def nan_for_none(value):
    """json_safe's None back to NaN, for the table formatters."""
    if isinstance(value, dict):
        return {k: nan_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_for_none(v) for v in value]
    return math.nan if value is None else value


def summary_line(results: dict) -> str:
    """The J&F line of the console summary (results as json_safe'd: None for NaN)."""
    jf = results["J&F"]
    if results["metric"] != "lvos":
        return (f"J&F {jf:.4f}  J {results['J']['mean']:.4f}  F {results['F']['mean']:.4f}" if jf is not None
                else "J&F n/a (no object had a frame to score)")
    groups = "  ".join(f"{g} J&F {_num(results[g]['J&F'], 4)} ({results[g]['num_objects']} objects)"
                       for g in ("seen", "unseen"))
    if jf is None:
        return (f"J&F n/a: {results['protocol']} averages the seen and the unseen videos' means and one group is "
                f"empty here ({groups}); over all objects J&F {_num(results['all_objects']['J&F'], 4)}")
    return (f"J&F ({results['protocol']}: seen and unseen averaged) {jf:.4f}  J {results['J']['mean']:.4f}  "
            f"F {results['F']['mean']:.4f}  V {_num(results['V'], 4)}  ({groups}; decay null, see results.json)")


def report(results: dict) -> None:
    """Print the metrics table (with ground truth), the speed table and the summary lines."""
    shown = nan_for_none(results)
    if results.get("metric") is not None:
        print(format_table(shown))
    print(_speed_table(results["sequences"], shown))
    ranks = f" over {results['world_size']} ranks" if results.get("world_size", 1) > 1 else ""
    print(f"FPS {_num(shown['fps'])} ({results['frames']} frames / {shown['seconds']:.2f} s tracker time{ranks}; "
          f"object initialization included, disk I/O excluded)  wall FPS {_num(shown['wall_fps'])} (frames tracked "
          f"in this run / {shown['wall_seconds']:.2f} s wall time)  reuse rate {percent(shown['reuse_rate'])} "
          f"({results['reused_object_frames']} of {results['tracked_object_frames']} object-frames)")
    if results.get("metric") is not None:
        print(summary_line(results))
    if "submission" in results:
        sub = results["submission"]
        print(f"submission: {sub['path']} ({sub['videos']} videos, {sub['frames']} frames)")
        if sub["missing"]:
            print(f"warning: {len(sub['missing'])} video(s) have no finished results and are not in the zip "
                  f"(e.g. {', '.join(sub['missing'][:5])}); run them, e.g. with --resume", file=sys.stderr)
    print(f"wrote {Path(results['results_dir']) / 'results.json'}")
