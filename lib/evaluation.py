"""Evaluation as a library: evaluate.py's job in small named steps.

    job = prepare(config, ctx, ...)          paths, checkpoint, data set, results directory
    todo = pending(job, config.resume)       sequences still to track (the same list on every rank)
    outcome = track_sequences(job, mine)     this rank's share: PNGs, timeline, statistics on disk
    results = collect_results(job, outcomes) J&F from the PNGs, FPS, reuse rate, metadata, zip
    report(results)                          the console summary

`evaluate(config)` (an `EvalConfig`) runs them, one process or one per torchrun rank
(lib.distributed): the
sequences are sharded over the ranks, each rank writes its own sequences, and rank 0 alone
collects, writes results.json / results.csv / the zip and reports.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from dataset.presets import PRESETS, DataConfig, EvalData
from lib import distributed
from lib.cli import UsageError, resolve_device
from lib.fileio import make_dirs
from lib.metrics import format_table, json_safe, write_results
from lib.results import (evaluate_data_dir, read_sequence_stats, results_dir, sequence_complete, summarize_tracking,
                         write_json, write_submission_zip)
from lib.tracking import SequenceFailure, percent, track_lockstep, track_one_by_one

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
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class EvalConfig(DataConfig):
    """An evaluation (evaluate.py's flags, docs/evaluation.md): the data (DataConfig's fields), the
    model and how it runs, and where results go. TH is one threshold, or a tuple of them for a
    threshold sweep (lib.sweep). A path left None is read from the environment when the job is
    prepared (models_dir: $RVOS_MODELS, else ./weights; output_root: $RVOS_OUTPUT, else .).
    score: a results folder to score instead of running a model (lib.score)."""
    model: Optional[str] = None
    models_dir: Optional[Path] = None
    ftext: Optional[str] = None
    backbone_weights: str = "imagenet"
    num_aug: int = 5
    fast: bool = True
    TH: float | tuple[float, ...] = 0.7
    timing_runs: int = 3
    seed: int = 0
    dev: Optional[str] = None
    precision: str = "fp32"
    resume: bool = False
    batch_sequences: int = 1
    compile: bool = False
    score: Optional[Path] = None
    output_root: Optional[Path] = None


def config_arguments(config: EvalConfig) -> dict:
    """The config as results.json records it ("args"): every field, paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


# ---------------------------------------------------------------------------------------------
# Resolution


def resolve_model(model: Optional[str], models_dir: Path) -> Path:
    """--model as a path, else as a name in --models-dir (suffix optional); with no --model, the
    only checkpoint in --models-dir."""
    models_dir = Path(models_dir).expanduser()
    if model is None:
        if not models_dir.is_dir():
            raise FileNotFoundError(f"no --model given and the models directory {models_dir.absolute()} does not exist "
                                    f"(pass --model PATH, or set --models-dir / $RVOS_MODELS)")
        found = sorted(p for p in models_dir.iterdir()
                       if p.is_file() and any(p.name.endswith(s) for s in CHECKPOINT_SUFFIXES))
        if len(found) == 1:
            return found[0].resolve()
        if not found:
            raise FileNotFoundError(f"no --model given and no checkpoint (*.pth) in the models directory "
                                    f"{models_dir.absolute()} (--models-dir / $RVOS_MODELS)")
        raise UsageError(f"no --model given and {len(found)} checkpoints in {models_dir} "
                         f"({', '.join(p.name for p in found)}): pass --model")
    path = Path(model).expanduser()
    tried = [path]
    if not path.is_absolute():
        named = models_dir / model
        tried.append(named)
        tried += [named.with_name(named.name + s) for s in CHECKPOINT_SUFFIXES if not model.endswith(s)]
    for candidate in tried:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"checkpoint not found: --model {model} (looked for "
                            f"{', '.join(str(p) for p in dict.fromkeys(tried))}; model names are looked up in "
                            f"--models-dir / $RVOS_MODELS, default ./weights)")


def load_checkpoint(path: Path, ftext: Optional[str]) -> tuple[dict, str, bool]:
    """(checkpoint dict, backbone name, has reuse gate); UsageError when it is not a G-FRTM/FRTM
    checkpoint or its backbone is not --ftext."""
    from models.checkpoint import check_backbone, network_state, read_checkpoint

    ckpt = read_checkpoint(path)
    try:
        _, backbone, has_gate = network_state(ckpt)
    except KeyError as exc:
        raise UsageError(f"checkpoint {path} (--model) is not a G-FRTM/FRTM checkpoint: {exc.args[0]}") from exc
    check_backbone(backbone, ftext, f"the checkpoint {path} (--model)")
    return ckpt, backbone, has_gate


def load_data(config: DataConfig) -> EvalData:
    """The --dset preset's data, checked before anything is tracked: every evaluated frame of a
    data set with ground truth has its annotation."""
    data = PRESETS[config.dset].load(config)
    if data.metric == "davis":
        for seq in data.sequences:
            seq.check_ground_truth(data.eval_frames.get(seq.name))
    return data


@dataclass
class Job:
    """Everything the steps share: resolved paths, checkpoint, data, device and settings."""
    config: EvalConfig
    ctx: distributed.Context
    device: torch.device
    device_text: str
    checkpoint: Path
    ckpt: dict
    backbone: str
    has_gate: bool
    data: EvalData
    out_dir: Path
    settings: dict


def prepare(config: EvalConfig, ctx: distributed.Context, device: torch.device, device_text: str) -> Job:
    """Resolve paths (flags, then environment), read the checkpoint and check the data set."""
    models_dir = Path(config.models_dir if config.models_dir is not None else os.environ.get("RVOS_MODELS") or "weights")
    output_root = Path(config.output_root if config.output_root is not None else os.environ.get("RVOS_OUTPUT") or ".")
    checkpoint = resolve_model(config.model, models_dir)
    ckpt, backbone, has_gate = load_checkpoint(checkpoint, config.ftext)
    data = load_data(config)
    out_dir = results_dir(output_root, config.dset, checkpoint, config.TH, config.fast).resolve()
    settings = {"checkpoint": str(checkpoint), "threshold": float(config.TH), "fast": bool(config.fast),
                "num_aug": int(config.num_aug), "seed": int(config.seed), "backbone_weights": str(config.backbone_weights),
                "precision": str(config.precision)}
    return Job(config, ctx, device, device_text, checkpoint, ckpt, backbone, has_gate, data, out_dir, settings)


# ---------------------------------------------------------------------------------------------
# Tracking


def pending(job: Job, resume: bool) -> list[str]:
    """Names of the sequences to track: all, or with --resume those not finished with the same
    settings. Decided by rank 0 and shared, so that every rank shards the same list even while
    other ranks start writing."""
    todo = None
    if job.ctx.is_main:
        todo = []
        for seq in job.data.sequences:
            if resume and sequence_complete(job.out_dir, seq.name, seq.frame_names):
                if read_sequence_stats(job.out_dir, seq.name).get("settings") == job.settings:
                    continue
            todo.append(seq.name)
    return distributed.all_gather(job.ctx, todo)[0]


def my_share(job: Job, todo: list[str]) -> list:
    """This rank's sequences of `todo` (assigned longest first, balanced by frames x objects),
    tracked in the data set's order (so one process runs exactly as before)."""
    by_name = {seq.name: seq for seq in job.data.sequences}
    costs = {name: distributed.sequence_cost(by_name[name]) for name in todo}
    mine = set(distributed.shard(costs, job.ctx.world_size)[job.ctx.rank])
    return [seq for seq in job.data.sequences if seq.name in mine]


def build_tracker(job: Job):
    from models import build_tracker as build

    config = job.config
    try:
        return build(job.ckpt, device=job.device, fast=config.fast, num_aug=config.num_aug,
                     backbone_weights=config.backbone_weights, ftext=config.ftext, seed=config.seed,
                     precision=config.precision, compile=config.compile)
    except KeyError as exc:
        raise UsageError(f"checkpoint {job.checkpoint} (--model): {exc.args[0]}") from exc


def track_sequences(job: Job, sequences: list, tracker=None, frames: Optional[dict] = None) -> dict:
    """Track this rank's sequences, stopping at the first failure (with `tracker`, else a new
    one; `frames`: {sequence name: its frames in memory} for those not to be read from disk).
    Returns this rank's outcome: {"rank", "sequences", "frames", "tracker_seconds",
    "wall_seconds", "failure"} with failure None or {"sequence", "error"}; `error` (the
    exception) is kept for the caller."""
    outcome = {"rank": job.ctx.rank, "sequences": [], "frames": 0, "tracker_seconds": 0.0, "wall_seconds": 0.0,
               "failure": None}
    if not sequences:
        return outcome
    tracker = build_tracker(job) if tracker is None else tracker
    frames = frames or {}
    if job.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as upstream
        # Untimed warm-up (CUDA context, cuDNN autotuning), like upstream's speedrun.
        first = sequences[0]
        for _ in tracker.track((first[i] for i in range(min(2, len(first)))), job.config.TH, keep_probabilities=False):
            pass
    make_dirs(job.out_dir, "the results folder", "--output-root or $RVOS_OUTPUT")
    started = time.perf_counter()
    track = track_lockstep if job.config.batch_sequences > 1 else track_one_by_one
    try:
        for name, stats in track(job, tracker, sequences, frames):
            outcome["sequences"].append(name)
            outcome["frames"] += stats["frames"]
            outcome["tracker_seconds"] += stats["seconds"]
    except SequenceFailure as failure:
        outcome["failure"] = {"sequence": failure.sequence,
                              "error": _with_context(str(failure.error), failure.sequence, job.out_dir)}
        outcome["exception"] = failure.error
    outcome["wall_seconds"] = time.perf_counter() - started
    return outcome


def _with_context(message: str, sequence: str, out_dir: Path) -> str:
    return (f"{message} (while tracking sequence {sequence!r}; finished sequences are kept in {out_dir}; "
            f"continue with --resume)")


USER_ERRORS = (UsageError, FileNotFoundError)


def exchange_outcomes(job: Job, outcome: dict) -> list[dict]:
    """Gather every rank's outcome (a barrier). When a rank failed: in one process the original
    error with the sequence named; over several ranks each failed rank raises UsageError naming
    the first failed rank and its sequence (the same text on each; lib.cli.run prints it once)
    or re-raises a non-input error (for its traceback), and the other ranks exit with status 2
    silently."""
    exception = outcome.pop("exception", None)
    if not job.ctx.distributed:
        if exception is not None:
            message = outcome["failure"]["error"]
            if isinstance(exception, USER_ERRORS):
                error_type = FileNotFoundError if isinstance(exception, FileNotFoundError) else UsageError
                raise error_type(message) from exception
            raise exception
        return [outcome]
    outcomes = distributed.all_gather(job.ctx, outcome)
    message = distributed.first_failure(outcomes, job.ctx.world_size)
    if message is None:
        return outcomes
    if exception is None:
        raise SystemExit(2)  # a rank that failed says so (lib.cli.run prints one line for the job)
    if not isinstance(exception, USER_ERRORS):
        raise exception
    raise UsageError(message) from exception


# ---------------------------------------------------------------------------------------------
# Results


def collect_results(job: Job, outcomes: list[dict], computed: list[str]) -> dict:
    """Rank 0: per-sequence statistics from disk, J&F from the PNGs, overall FPS / wall FPS /
    reuse rate, the metadata block; writes results.json (and results.csv, the zip)."""
    config, data = job.config, job.data
    per_sequence = {seq.name: read_sequence_stats(job.out_dir, seq.name) for seq in data.sequences}
    for stats in per_sequence.values():
        stats.pop("settings", None)
    overall = summarize_tracking(per_sequence)
    wall = max((o["wall_seconds"] for o in outcomes), default=0.0)
    frames_now = sum(o["frames"] for o in outcomes)
    overall["wall_seconds"] = wall
    overall["wall_fps"] = frames_now / wall if frames_now and wall > 0 else math.nan

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
        "precision": str(config.precision),
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


def _nan_for_none(value):
    """json_safe's None back to NaN, for the table formatters."""
    if isinstance(value, dict):
        return {k: _nan_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
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
    shown = _nan_for_none(results)
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


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def announce(job: Job) -> None:
    """Print the device, checkpoint and data of a job (rank 0)."""
    ctx, config = job.ctx, job.config
    print(f"device: {job.device_text}" + (f" (rank 0 of {ctx.world_size}, {ctx.backend})" if ctx.distributed else ""))
    print(f"checkpoint: {job.checkpoint} ({job.backbone}, {'G-FRTM' if job.has_gate else 'FRTM: no reuse gate'})")
    print(f"data: {config.dset} = {job.data.name} at {job.data.root}, {len(job.data.sequences)} sequence(s)")


def evaluate(config: EvalConfig) -> dict:
    """Run the evaluation `config` describes (with one threshold, or a sweep over several), in
    this process or as one torchrun rank. Returns the results dict (as written to results.json) on rank 0, {} on the
    other ranks. Raises FileNotFoundError / UsageError naming the path or flag at fault."""
    return _evaluate(config, distributed.launch_context())


def _evaluate(config: EvalConfig, ctx: distributed.Context) -> dict:
    device, device_text = resolve_device(distributed.rank_device(ctx, config.dev))
    ctx = distributed.init(ctx, device)
    try:
        if isinstance(config.TH, (tuple, list)):  # several thresholds: the trade-off curve
            from lib.sweep import sweep
            return sweep(config, ctx, device, device_text)
        job = prepare(config, ctx, device, device_text)
        if ctx.is_main:
            announce(job)
            print(f"results: {job.out_dir}")
        todo = pending(job, config.resume)
        if config.resume and ctx.is_main:
            print(f"resume: {len(job.data.sequences) - len(todo)} sequence(s) already finished, {len(todo)} to run")
        outcome = track_sequences(job, my_share(job, todo))
        outcomes = exchange_outcomes(job, outcome)
        results = {}
        try:
            if ctx.is_main:
                results = collect_results(job, outcomes, todo)
                report(results)
        finally:
            # Leave the process group together: gloo can abort a rank (SIGABRT) that leaves while
            # another still holds its connections. Every rank reaches this, rank 0 also on error.
            distributed.all_gather(ctx, None)
        return results
    finally:
        distributed.shutdown(ctx)
