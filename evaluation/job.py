"""An evaluation job: evaluate.py's configuration, resolved (paths, checkpoint, data set, results
directory, device), and the sequences each rank tracks.

    job = prepare(config, ctx, ...)          paths, checkpoint, data set, results directory
    todo = pending(job, config.resume)       sequences still to track (the same list on every rank)
    mine = my_share(job, todo)               this rank's sequences
    tracker = job_tracker(job)               the job's tracker

--model is a checkpoint, or a folder written by export.py (its graphs run by onnxruntime:
`deploy.ExportedTracker`, which the script hands in as `open_exported`, so that evaluation does
not depend on deploy/). The steps after these: evaluation.tracking (track_sequences,
exchange_outcomes), evaluation.report (collect_results, report); evaluation.run.evaluate runs
them all.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from dataset.presets import PRESETS, DataConfig, EvalData
from evaluation.results import read_sequence_stats, results_dir, sequence_complete
from lib import distributed
from lib.errors import UsageError
from lib.manifest import read_manifest

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar")


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class EvalConfig(DataConfig):
    """An evaluation (evaluate.py's flags, docs/evaluation.md): the data (DataConfig's fields), the
    model and how it runs, and where results go. TH is one threshold, or a tuple of them for a
    threshold sweep (evaluation.sweep). A path left None is read from the environment when the job is
    prepared (models_dir: $RVOS_MODELS, else ./weights; output_root: $RVOS_OUTPUT, else .).
    score: a results folder to score instead of running a model (evaluation.score)."""
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
    """--model as a path, else as a name in --models-dir (suffix optional; a folder: an export of
    export.py); with no --model, the only checkpoint in --models-dir."""
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
        if candidate.is_file() or candidate.is_dir():  # a folder: an export (read_model checks it)
            return candidate.resolve()
    raise FileNotFoundError(f"checkpoint not found: --model {model} (looked for "
                            f"{', '.join(str(p) for p in dict.fromkeys(tried))}; model names are looked up in "
                            f"--models-dir / $RVOS_MODELS, default ./weights)")


def read_model(path: Path, ftext: Optional[str]) -> tuple[Optional[dict], str, bool]:
    """(checkpoint dict, backbone name, has reuse gate) of a checkpoint, or (None, ...) of an
    exported folder (its manifest); UsageError when it is not a G-FRTM/FRTM checkpoint or a
    sound export, or its backbone is not --ftext."""
    from models.checkpoint import check_backbone, network_state, read_checkpoint

    if path.is_dir():
        manifest = read_manifest(path, "--model")
        check_backbone(manifest["backbone"], ftext, f"the exported folder {path} (--model)")
        return None, manifest["backbone"], bool(manifest["has_gate"])
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
    exported: Optional[dict] = None  # an exported folder's manifest (--model DIR); None: a checkpoint

    @property
    def runtime(self) -> str:
        """What runs the tracker: "torch" (a checkpoint) or "onnxruntime" (an exported folder)."""
        return "torch" if self.exported is None else "onnxruntime"


# Settings an export fixes (export.py's flags of the same names): the manifest's field for each.
FIXED_AT_EXPORT = {"num_aug": ("--num-aug", lambda m: int(m["num_aug"])), "seed": ("--seed", lambda m: int(m["seed"])),
                   "fast": ("--fast/--no-fast", lambda m: bool(m["target_model"]["fast"])),
                   "backbone_weights": ("--backbone-weights", lambda m: str(m["backbone_weights"]))}


def exported_settings(folder: Path, manifest: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """The settings an exported folder runs with: num_aug, seed, fast and backbone_weights as
    exported, precision "fp32" or "int8" as exported, runtime "onnxruntime". `given`: the flags
    set to other values than their defaults ({field: value}); UsageError for one that contradicts
    the export (--num-aug 3 for a folder exported with 5) or does not apply to onnxruntime
    (--precision, --compile, --batch-sequences, a --dev other than the CPU)."""
    fix = "export the checkpoint again with export.py, or evaluate the checkpoint itself"
    for name, value in given.items():
        if name in FIXED_AT_EXPORT:
            flag, exported = FIXED_AT_EXPORT[name]
            if value != exported(manifest):
                raise UsageError(f"{flag} {value}: the exported folder {folder} (--model) was exported with "
                                 f"{flag} {exported(manifest)}, fixed in its graphs; leave {flag} out, or {fix}")
        elif name == "precision":
            raise UsageError(f"--precision {value}: the exported folder {folder} (--model) runs at the precision it "
                             f"was exported with ({manifest['precision']}; export.py --int8 for int8); leave "
                             f"--precision out, or evaluate the checkpoint itself with --precision {value}")
        elif name == "compile" and value:
            raise UsageError(f"--compile is for checkpoints (torch.compile); the exported folder {folder} (--model) "
                             f"runs under onnxruntime, which optimises its graphs when it loads them: leave "
                             f"--compile out")
        elif name == "batch_sequences" and value > 1:
            raise UsageError(f"--batch-sequences {value}: lockstep tracking is for checkpoints; the exported folder "
                             f"{folder} (--model) tracks one sequence at a time: leave --batch-sequences out")
        elif name == "dev" and value is not None and not str(value).startswith("cpu"):
            raise UsageError(f"--dev {value}: the exported folder {folder} (--model) runs on onnxruntime's CPU "
                             f"provider here (other providers: deploy.ExportedTracker(folder, providers=...) from "
                             f"Python); use --dev cpu or leave --dev out")
    return {**{name: exported(manifest) for name, (_, exported) in FIXED_AT_EXPORT.items()},
            "precision": str(manifest["precision"]), "runtime": "onnxruntime"}


def changed_fields(config: Any, defaults: Mapping[str, Any]) -> dict:
    """{field: value} of `config`'s fields (a dataclass or namespace) whose values differ from
    `defaults`: the flags a user set."""
    return {name: getattr(config, name) for name, default in defaults.items()
            if hasattr(config, name) and getattr(config, name) != default}


EVAL_DEFAULTS = {f.name: f.default for f in fields(EvalConfig)}


def prepare(config: EvalConfig, ctx: distributed.Context, device: torch.device, device_text: str) -> Job:
    """Resolve paths (flags, then environment), read the checkpoint and check the data set."""
    models_dir = Path(config.models_dir if config.models_dir is not None else os.environ.get("RVOS_MODELS") or "weights")
    output_root = Path(config.output_root if config.output_root is not None else os.environ.get("RVOS_OUTPUT") or ".")
    checkpoint = resolve_model(config.model, models_dir)
    ckpt, backbone, has_gate = read_model(checkpoint, config.ftext)
    exported = None
    if ckpt is None:  # an exported folder: the settings it was exported with
        exported = read_manifest(checkpoint, "--model")
        fixed = exported_settings(checkpoint, exported, changed_fields(config, EVAL_DEFAULTS))
        config = replace(config, **{k: fixed[k] for k in ("num_aug", "seed", "fast", "backbone_weights")})
    data = load_data(config)
    out_dir = results_dir(output_root, config.dset, checkpoint, config.TH, config.fast).resolve()
    settings = {"checkpoint": str(checkpoint), "threshold": float(config.TH), "fast": bool(config.fast),
                "num_aug": int(config.num_aug), "seed": int(config.seed), "backbone_weights": str(config.backbone_weights),
                "precision": str(config.precision)}
    if exported is not None:
        settings.update(precision=str(exported["precision"]), runtime="onnxruntime",
                        checkpoint_sha256=exported["checkpoint"]["sha256"])
    return Job(config, ctx, device, device_text, checkpoint, ckpt, backbone, has_gate, data, out_dir, settings,
               exported)


# ---------------------------------------------------------------------------------------------
# This rank's sequences


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


def job_tracker(job: Job, open_exported: Optional[Callable[[Path], Any]] = None):
    """The job's tracker: models.build_tracker with the job's settings, or for an exported folder
    `open_exported(folder)` (evaluate.py passes deploy.ExportedTracker: any object with
    models.Tracker's `track`, `augmenter` and `seed`)."""
    from models import build_tracker

    if job.exported is not None:
        if open_exported is None:
            raise UsageError(f"--model {job.checkpoint} is an exported folder: its tracker runs under onnxruntime; "
                             f"pass open_exported=deploy.ExportedTracker (evaluate.py does)")
        return open_exported(job.checkpoint)
    config = job.config
    try:
        return build_tracker(job.ckpt, device=job.device, fast=config.fast, num_aug=config.num_aug,
                     backbone_weights=config.backbone_weights, ftext=config.ftext, seed=config.seed,
                     precision=config.precision, compile=config.compile)
    except KeyError as exc:
        raise UsageError(f"checkpoint {job.checkpoint} (--model): {exc.args[0]}") from exc


def announce(job: Job) -> None:
    """Print the device, checkpoint and data of a job (rank 0)."""
    ctx, config = job.ctx, job.config
    print(f"device: {job.device_text}" + (f" (rank 0 of {ctx.world_size}, {ctx.backend})" if ctx.distributed else ""))
    kind = f"{job.backbone}, {'G-FRTM' if job.has_gate else 'FRTM: no reuse gate'}"
    if job.exported is None:
        print(f"checkpoint: {job.checkpoint} ({kind})")
    else:
        s = job.settings
        print(f"exported: {job.checkpoint} ({kind}; onnxruntime {s['precision']}; as exported: num_aug {s['num_aug']}, "
              f"seed {s['seed']}, {'fast' if s['fast'] else 'no-fast'}, backbone weights {s['backbone_weights']})")
    print(f"data: {config.dset} = {job.data.name} at {job.data.root}, {len(job.data.sequences)} sequence(s)")
