"""Evaluate G-FRTM (or FRTM) on DAVIS / YouTube-VOS validation sets (SPEC §9).

    python evaluate.py --model gfrtm_rn18.pth --ftext resnet18 --dset dv2017val --dev cuda:0 --TH 0.7

Writes DAVIS-palette label PNGs to `<output root>/result/<dset>-<model stem>_<TH>[_fast]/<seq>/`,
computes J&F from those PNGs (datasets with ground truth), FPS and reuse rate, and writes
results.json / results.csv next to the masks; for yt2018val / yt2018valAll also the
submission zip `<results dir>.zip`. `python evaluate.py --help` lists every option.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from dataset.davis import DAVISDataset, list_davis_sequences, resolve_davis_root
from dataset.ytvos import YouTubeVOSDataset, resolve_ytvos_root, valid_frame_names
from lib.metrics import format_table, write_results
from lib.background import BackgroundWriter, read_ahead
from lib.cli import (UsageError, add_backbone_weights_flag, add_data_root_flags, add_device_flag,
                     add_num_aug_flag, add_precision_flag, add_seed_flag, add_threshold_flag, resolve_device, run)
from lib.metrics import json_safe
from lib.results import (SequenceWriter, TrackingStats, evaluate_results_dir,
                         read_sequence_stats, results_dir, sequence_complete, summarize_tracking, write_json,
                         write_submission_zip)

# --dset -> (reader, DAVIS year or YouTube-VOS split)
DATASETS = {
    "dv2016val": ("davis", "2016"),
    "dv2017val": ("davis", "2017"),
    "yt2018jjval": ("ytvos", "jjval"),
    "yt2018jjvalAll": ("ytvos", "jjval_all_frames"),
    "yt2018val": ("ytvos", "valid"),
    "yt2018valAll": ("ytvos", "valid_all_frames"),
}
WITH_GROUND_TRUTH = ("dv2016val", "dv2017val", "yt2018jjval", "yt2018jjvalAll")
SUBMISSION = ("yt2018val", "yt2018valAll")

FPS_DEFINITION = ("frames / tracker time: object initialization (first-frame augmentation and target-model "
                  "training) included; reading frames from disk and writing PNGs excluded; on CUDA a frame's "
                  "time ends when its labels are on the host. wall_fps: frames / wall time of the sequence "
                  "loop (reading ahead, tracking, writing behind, until the last PNG is on disk)")
READ_AHEAD = 4  # frames decoded ahead of the tracker
REUSE_DEFINITION = ("reused object-frames / tracked object-frames, an object being tracked in every frame after "
                    "its first")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar")


# ---------------------------------------------------------------------------------------------
# Command line


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Run G-FRTM (or FRTM) on a validation set: label PNGs, J&F (where ground truth exists), "
                    "FPS and reuse rate; a submission zip for the YouTube-VOS valid splits.",
        epilog="Results: <output root>/result/<dset>-<model stem>_<TH>[_fast]/<sequence>/<frame>.png, with "
               "results.json and results.csv beside the sequence folders. Errors in the input (missing files, "
               "corrupt frames, a checkpoint that does not fit) stop with one line naming the path or flag; "
               "sequences finished before stay valid, and --resume continues.")
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default=None,
                   help="checkpoint (released G-FRTM / FRTM .pth, or ours): a path, or a file name looked up in "
                        "--models-dir (default: the only checkpoint in --models-dir)")
    g.add_argument("--models-dir", type=Path, default=None,
                   help="where --model names are looked up (default: $RVOS_MODELS, else ./weights)")
    g.add_argument("--ftext", choices=("resnet18", "resnet101"), default=None,
                   help="feature extractor (backbone); checked against the checkpoint, inferred from it when "
                        "omitted")
    add_backbone_weights_flag(g)
    add_num_aug_flag(g, default=5)
    g.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                   help="fewer target-model optimizer steps, as upstream always evaluated (default: --fast)")
    add_threshold_flag(g)
    add_seed_flag(g)
    add_device_flag(g)
    add_precision_flag(g)

    g = parser.add_argument_group("data")
    g.add_argument("--dset", choices=tuple(DATASETS), default="dv2016val",
                   help="dv2016val, dv2017val (DAVIS val); yt2018jjval (YouTube-VOS 2018 train held-out "
                        "videos, every 5th frame); yt2018jjvalAll (the same on all frames, scored on the "
                        "annotated every-5th frames); yt2018val, yt2018valAll (YouTube-VOS valid, every 5th / "
                        "all frames: no ground truth, writes a submission zip) (default: dv2016val)")
    add_data_root_flags(g)
    g.add_argument("--split-file", type=Path, default=None,
                   help="YouTube-VOS only: file listing the videos to use, one per line (default: "
                        "dataset/splits/ytvos_jjvalid.txt for yt2018jjval*, every valid video for yt2018val*)")
    g.add_argument("--sequences", nargs="+", default=None, metavar="SEQ",
                   help="run (and score) only these sequences (space or comma separated); they are recomputed "
                        "even when already finished")
    g.add_argument("--resume", action="store_true",
                   help="skip sequences already finished in the results directory with the same settings "
                        "(their PNGs and timings are reused); the metrics still cover every requested sequence")

    g = parser.add_argument_group("output")
    g.add_argument("--output-root", type=Path, default=None,
                   help="results go to <output root>/result/... (default: $RVOS_OUTPUT, else .)")
    return parser


# ---------------------------------------------------------------------------------------------
# Resolution of paths, device and data


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


def _requested(args) -> Optional[list[str]]:
    if not args.sequences:
        return None
    names = [n.strip() for item in args.sequences for n in item.split(",") if n.strip()]
    return list(dict.fromkeys(names)) or None


def _check_requested(requested: Optional[list[str]], names: list[str], where: str) -> list[str]:
    if not names:
        raise UsageError(f"no sequences listed in {where}")
    if requested is None:
        return names
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise UsageError(f"--sequences: {', '.join(unknown)} not in {where} "
                         f"({len(names)} sequences, e.g. {', '.join(names[:3])})")
    return [n for n in names if n in set(requested)]


class EvalData:
    """The requested sequences of a --dset and what evaluating them needs."""

    def __init__(self, args):
        self.dset = args.dset
        reader, part = DATASETS[args.dset]
        requested = _requested(args)
        self.eval_frames: dict[str, Optional[list[str]]] = {}  # sequence -> annotated frames to score on
        self.submission_videos: dict[str, list[str]] = {}  # video -> frames the server expects
        if reader == "davis":
            self.root = resolve_davis_root(args.davis_root)
            imageset = self.root / "ImageSets" / part / "val.txt"
            names = _check_requested(requested, list_davis_sequences(self.root, part, "val"), str(imageset))
            dataset = DAVISDataset(self.root, part, "val", sequences=names)
        else:
            self.root = resolve_ytvos_root(args.ytvos_root)
            split_file = args.split_file
            if split_file is not None and not Path(split_file).expanduser().is_file():
                raise FileNotFoundError(f"--split-file {split_file} not found")
            full = YouTubeVOSDataset(self.root, part, split_file=split_file)
            where = str(split_file) if split_file else f"the YouTube-VOS {part} video list"
            names = _check_requested(requested, full.sequence_names, where)
            dataset = full if requested is None else YouTubeVOSDataset(self.root, part, sequences=names,
                                                                       split_file=split_file)
            if args.dset in SUBMISSION:
                self.submission_videos = {v: valid_frame_names(self.root, v) for v in full.sequence_names}
        self.name = dataset.name
        # Build every sequence now: a missing first-frame annotation or an empty first-frame mask
        # fails before hours of tracking.
        self.sequences = [dataset.sequence(n) for n in dataset.sequence_names]

        if args.dset == "yt2018jjvalAll":
            annotated = YouTubeVOSDataset(self.root, "jjval", sequences=names, split_file=split_file)
            for seq in self.sequences:
                frames = annotated.sequence(seq.name).frame_names
                extra = [f for f in frames if f not in seq.frame_names]
                if extra:
                    raise FileNotFoundError(f"annotated frame {extra[0]!r} of {seq.name!r} has no image in "
                                            f"{seq.image_paths[0].parent}")
                self.eval_frames[seq.name] = frames
        if args.dset in WITH_GROUND_TRUTH:
            for seq in self.sequences:
                seq.check_ground_truth(self.eval_frames.get(seq.name))
        for seq in self.sequences:
            expected = self.submission_videos.get(seq.name, [])
            missing = [f for f in expected if f not in seq.frame_names]
            if missing:
                raise FileNotFoundError(f"valid frame {missing[0]!r} of {seq.name!r} has no image in "
                                        f"{seq.image_paths[0].parent}")


# ---------------------------------------------------------------------------------------------
# Main


def _load_checkpoint(path: Path, ftext: Optional[str]) -> tuple[dict, str, bool]:
    from models.checkpoint import check_backbone, network_state, read_checkpoint

    ckpt = read_checkpoint(path)
    try:
        _, backbone, has_gate = network_state(ckpt)
    except KeyError as exc:
        raise UsageError(f"checkpoint {path} (--model) is not a G-FRTM/FRTM checkpoint: {exc.args[0]}") from exc
    check_backbone(backbone, ftext, f"the checkpoint {path} (--model)")
    return ckpt, backbone, has_gate


def _settings(args, checkpoint: Path) -> dict:
    """What a finished sequence must share with this run for --resume to keep it."""
    return {"checkpoint": str(checkpoint), "threshold": float(args.TH), "fast": bool(args.fast),
            "num_aug": int(args.num_aug), "seed": int(args.seed), "backbone_weights": str(args.backbone_weights),
            "precision": str(args.precision)}


def _with_context(exc: Exception, sequence: str, out_dir: Path) -> Exception:
    message = (f"{exc} (while tracking sequence {sequence!r}; finished sequences are kept in {out_dir}; "
               f"continue with --resume)")
    try:
        return type(exc)(message)
    except Exception:  # an exception type with a different constructor
        return ValueError(message)


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _speed_table(per_sequence: dict, overall: dict) -> str:
    def fps(value) -> str:
        return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"

    rows = [(name, str(s["frames"]), fps(s.get("fps")), fps(s.get("wall_fps")), _pct(s.get("reuse_rate")))
            for name, s in per_sequence.items()]
    rows.append(("overall", str(overall["frames"]), fps(overall["fps"]), fps(overall["wall_fps"]),
                 _pct(overall["reuse_rate"])))
    header = ("Sequence", "Frames", "FPS", "Wall FPS", "Reuse")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))
             for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(args) -> dict:
    """Run the evaluation described by parsed arguments; return the results dict (as written to
    results.json). Raises FileNotFoundError / ValueError naming the path or flag at fault."""
    models_dir = Path(args.models_dir if args.models_dir is not None else os.environ.get("RVOS_MODELS") or "weights")
    output_root = Path(args.output_root if args.output_root is not None else os.environ.get("RVOS_OUTPUT") or ".")

    device, device_text = resolve_device(args.dev)
    checkpoint = resolve_model(args.model, models_dir)
    ckpt, backbone, has_gate = _load_checkpoint(checkpoint, args.ftext)
    data = EvalData(args)
    out_dir = results_dir(output_root, args.dset, checkpoint, args.TH, args.fast).resolve()
    settings = _settings(args, checkpoint)

    print(f"device: {device_text}")
    print(f"checkpoint: {checkpoint} ({backbone}, {'G-FRTM' if has_gate else 'FRTM: no reuse gate'})")
    print(f"data: {args.dset} = {data.name} at {data.root}, {len(data.sequences)} sequence(s)")
    print(f"results: {out_dir}")

    todo = []
    for seq in data.sequences:
        if args.resume and sequence_complete(out_dir, seq.name, seq.frame_names):
            if read_sequence_stats(out_dir, seq.name).get("settings") == settings:
                continue
        todo.append(seq)
    if args.resume:
        print(f"resume: {len(data.sequences) - len(todo)} sequence(s) already finished, {len(todo)} to run")

    if todo:
        from models import build_tracker

        try:
            tracker = build_tracker(ckpt, device=device, fast=args.fast, num_aug=args.num_aug,
                                    backbone_weights=args.backbone_weights, ftext=args.ftext, seed=args.seed,
                                    precision=args.precision)
        except KeyError as exc:
            raise UsageError(f"checkpoint {checkpoint} (--model): {exc.args[0]}") from exc
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as upstream
            # Untimed warm-up (CUDA context, cuDNN autotuning), like upstream's speedrun.
            first = todo[0]
            for _ in tracker.track((first[i] for i in range(min(2, len(first)))), args.TH,
                                   keep_probabilities=False):
                pass
        out_dir.mkdir(parents=True, exist_ok=True)
        # Disk I/O off the tracker's path: frames decoded ahead in one thread, PNGs written behind
        # in another; a sequence is finished (renamed into place) only once its PNGs are on disk.
        with BackgroundWriter() as background:
            for seq in todo:
                stats = TrackingStats()
                try:
                    with SequenceWriter(out_dir, seq.name, seq.frame_names, background) as writer:
                        start = time.perf_counter()
                        with tqdm(total=len(seq), desc=seq.name, unit="frame", file=sys.stderr,
                                  dynamic_ncols=True) as bar:
                            frames = read_ahead(seq, depth=READ_AHEAD)
                            for t, frame in enumerate(tracker.track(frames, args.TH, keep_probabilities=False)):
                                writer.write(seq.frame_names[t], frame.labels.numpy())
                                stats.add(frame, seq.frame_names[t])
                                bar.update(1)
                                bar.set_postfix(fps=f"{stats.fps:.1f}", reuse=_pct(stats.reuse_rate), refresh=False)
                        writer.flush()
                        stats.wall_seconds = time.perf_counter() - start
                        writer.write_json("timeline.json", {"fps": stats.fps, "frames": stats.timeline})
                        writer.finish({**stats.as_dict(), "settings": settings, "device": str(device),
                                       "torch_version": torch.__version__})
                except (FileNotFoundError, ValueError) as exc:
                    raise _with_context(exc, seq.name, out_dir) from exc

    per_sequence = {seq.name: read_sequence_stats(out_dir, seq.name) for seq in data.sequences}
    for stats in per_sequence.values():
        stats.pop("settings", None)
    overall = summarize_tracking(per_sequence)

    if args.dset in WITH_GROUND_TRUTH:
        print("Computing J&F from the written PNGs")
        results = evaluate_results_dir(out_dir, [(seq, data.eval_frames.get(seq.name)) for seq in data.sequences])
        for name, stats in per_sequence.items():
            results["sequences"][name].update(stats)
    else:
        results = {"sequences": per_sequence}
    results.update(overall)

    results.update({
        "dset": args.dset, "dataset": data.name, "data_root": str(data.root), "results_dir": str(out_dir),
        "checkpoint": str(checkpoint), "backbone": backbone, "gate": has_gate, "threshold": float(args.TH),
        "fast": bool(args.fast), "num_aug": args.num_aug, "seed": args.seed,
        "backbone_weights": str(args.backbone_weights), "device": str(device), "device_description": device_text,
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "command": [sys.executable] + sys.argv, "args": vars(args),
        "sequences_requested": [seq.name for seq in data.sequences],
        "sequences_computed": [seq.name for seq in todo],
        "fps_definition": FPS_DEFINITION, "reuse_rate_definition": REUSE_DEFINITION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    })
    if args.dset in SUBMISSION:
        submission = write_submission_zip(out_dir, data.submission_videos)
        results["submission"] = submission
    results = json_safe(results)

    if args.dset in WITH_GROUND_TRUTH:
        print(format_table(_nan_for_none(results)))
        write_results(results, out_dir)
    else:
        write_json(out_dir / "results.json", results)
    print(_speed_table(results["sequences"], _nan_for_none(overall)))
    print(f"FPS {overall['fps']:.2f} ({overall['frames']} frames / {overall['seconds']:.2f} s tracker time; "
          f"object initialization included, disk I/O excluded), wall FPS {overall['wall_fps']:.2f} (reading, "
          f"tracking and writing)  reuse rate {_pct(overall['reuse_rate'])} "
          f"({overall['reused_object_frames']} of {overall['tracked_object_frames']} object-frames)")
    if args.dset in WITH_GROUND_TRUTH:
        jf = results["J&F"]
        print(f"J&F {jf:.4f}  J {results['J']['mean']:.4f}  F {results['F']['mean']:.4f}" if jf is not None
              else "J&F n/a (no object had a frame to score)")
    if args.dset in SUBMISSION:
        sub = results["submission"]
        print(f"submission: {sub['path']} ({sub['videos']} videos, {sub['frames']} frames)")
        if sub["missing"]:
            print(f"warning: {len(sub['missing'])} video(s) have no finished results and are not in the zip "
                  f"(e.g. {', '.join(sub['missing'][:5])}); run them, e.g. with --resume", file=sys.stderr)
    print(f"wrote {out_dir / 'results.json'}")
    return results


def _nan_for_none(value):
    """json_safe's None back to NaN, for the table formatters."""
    if isinstance(value, dict):
        return {k: _nan_for_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_none(v) for v in value]
    return math.nan if value is None else value


if __name__ == "__main__":
    run(main, get_parser(), interrupted="interrupted (finished sequences are kept; continue with --resume)")
