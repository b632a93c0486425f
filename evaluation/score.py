"""Scoring a results folder that any method wrote (`evaluate.py --dset PRESET --score DIR`):
no model and no tracking, only the preset's ground truth and the folder's label PNGs.

    DIR/<sequence>/<frame>.png      label PNGs (pixel value = object id), named like the frames

J&F (and for LVOS also V) are computed as evaluation computes them after tracking (DAVIS
protocol, or lvos-evaluation's for lvos-val), and results.json / results.csv are written into
DIR, beside the sequence folders.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

from dataset.presets import PRESETS
from evaluation.job import EvalConfig
from evaluation.report import nan_for_none, summary_line
from evaluation.results import evaluate_data_dir
from lib.errors import UsageError
from lib.metrics import format_table, json_safe, write_results


def score_results(config: EvalConfig) -> dict:
    """Score the folder config.score against the ground truth of preset config.dset (config: a
    evaluation.job.EvalConfig; its data roots as for an evaluation, its sequences to score a
    subset). Writes results.json and results.csv into the folder, prints the table; returns the
    results dict. Raises UsageError for a preset without public ground truth, FileNotFoundError
    for a missing folder or PNG, UsageError for a PNG of the wrong size."""
    if not PRESETS[config.dset].ground_truth:
        with_gt = [name for name, p in PRESETS.items() if p.ground_truth]
        raise UsageError(f"--score: --dset {config.dset} has no public ground truth for its frames (its masks go to the "
                         f"evaluation server); presets that can be scored here: {', '.join(with_gt)}")
    data = PRESETS[config.dset].load(config)
    if data.metric is None:
        raise UsageError(f"--score: not every frame of --dset {config.dset} at {data.root} has an annotation PNG, so "
                         f"there is no ground truth to score against")
    folder = Path(config.score).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--score {folder}: no such folder (expected <sequence>/<frame>.png inside)")
    absent = [seq.name for seq in data.sequences if not (folder / seq.name).is_dir()]
    if absent:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        found_text = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "") if found else "no sequence folder"
        raise FileNotFoundError(f"--score {folder}: no folder {absent[0]}/ for sequence {absent[0]!r} of --dset "
                                f"{config.dset} ({len(absent)} of {len(data.sequences)} missing; found "
                                f"{found_text})")
    print(f"scoring {folder} against {config.dset} = {data.name} at {data.root}, {len(data.sequences)} sequence(s)")
    results = evaluate_data_dir(folder, data)
    results.update({
        "dset": config.dset, "dataset": data.name, "data_root": str(data.root), "results_dir": str(folder),
        "metric": data.metric, "scored": "--score: masks read from the results folder, no tracking",
        "command": [sys.executable] + sys.argv,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    })
    results = json_safe(results)
    write_results(results, folder)
    print(format_table(nan_for_none(results)))
    print(summary_line(results))
    print(f"wrote {folder / 'results.json'}")
    return results
