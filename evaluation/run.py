"""evaluate.py's work: `evaluate(config)` runs an evaluation with one threshold, or a sweep over
several (evaluation.sweep), in this process or as one torchrun rank (lib.distributed).

    job = prepare(config, ctx, ...)          paths, checkpoint, data set, results directory
    todo = pending(job, config.resume)       sequences still to track (the same list on every rank)
    outcome = track_sequences(job, mine)     this rank's share: PNGs, timeline, statistics on disk
    results = collect_results(job, outcomes) J&F from the PNGs, FPS, reuse rate, metadata, zip
    report(results)                          the console summary

The sequences are sharded over the ranks, each rank writes its own sequences, and rank 0 alone
collects, writes results.json / results.csv / the zip and reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from evaluation.job import EvalConfig, announce, job_tracker, my_share, pending, prepare
from evaluation.report import collect_results, report
from evaluation.sweep import sweep
from evaluation.tracking import exchange_outcomes, track_sequences
from lib import distributed
from lib.device import resolve_device


def evaluate(config: EvalConfig, open_exported: Optional[Callable[[Path], Any]] = None) -> dict:
    """Run the evaluation `config` describes (with one threshold, or a sweep over several), in
    this process or as one torchrun rank. Returns the results dict (as written to results.json) on rank 0, {} on the
    other ranks. Raises FileNotFoundError / UsageError naming the path or flag at fault.
    `open_exported(folder)`: the tracker of an exported folder (config.model a folder written by
    export.py), e.g. deploy.ExportedTracker, as evaluate.py passes it."""
    return _evaluate(config, distributed.launch_context(), open_exported)


def _evaluate(config: EvalConfig, ctx: distributed.Context, open_exported=None) -> dict:
    device, device_text = resolve_device(distributed.rank_device(ctx, config.dev))
    ctx = distributed.init(ctx, device)
    try:
        if isinstance(config.TH, (tuple, list)):  # several thresholds: the trade-off curve
            return sweep(config, ctx, device, device_text, open_exported)
        job = prepare(config, ctx, device, device_text)
        if ctx.is_main:
            announce(job)
            print(f"results: {job.out_dir}")
        todo = pending(job, config.resume)
        if config.resume and ctx.is_main:
            print(f"resume: {len(job.data.sequences) - len(todo)} sequence(s) already finished, {len(todo)} to run")
        mine = my_share(job, todo)
        outcome = track_sequences(job, mine, job_tracker(job, open_exported) if mine else None)
        outcomes = exchange_outcomes(job, outcome)
        results = {}
        try:
            if ctx.is_main:
                results = collect_results(job, outcomes, todo)
                report(results)
        finally:  # every rank reaches this, rank 0 also on error
            distributed.leave_together(ctx)
        return results
    finally:
        distributed.shutdown(ctx)
