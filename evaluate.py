"""Evaluate G-FRTM (or FRTM) on a benchmark (docs/evaluation.md): DAVIS, YouTube-VOS, MOSE, LVOS or a folder.

    python evaluate.py --model gfrtm_rn18.pth --ftext resnet18 --dset dv2017val --dev cuda:0 --TH 0.7
    torchrun --nproc_per_node=4 evaluate.py --model gfrtm_rn18.pth --dset yt2019val --dev cuda
    python evaluate.py --model gfrtm_rn18.pth --dset dv2017val --TH 1.0,0.9,0.8,0.7,0.6   # the trade-off curve

Writes DAVIS-palette label PNGs to `<output root>/result/<dset>-<model stem>_<TH>[_fast]/<seq>/`,
computes J&F from those PNGs (benchmarks with ground truth), FPS and reuse rate, and writes
results.json / results.csv next to the masks; for benchmarks without public ground truth the
server's submission zip `<results dir>.zip`. `--model` may also be a folder written by export.py:
its graphs run by onnxruntime (deploy.ExportedTracker), the same loop, results and reports
(docs/deployment.md). Several thresholds (evaluation.sweep) add curve.csv,
curve.json and curve.png beside the results directories. The work is done by the evaluation package
(presets in dataset.presets); `python evaluate.py --help` lists every option.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dataset.presets import PRESETS
from evaluation.job import EvalConfig
from evaluation.run import evaluate
from evaluation.score import score_results
from lib.cli import (UsageError, add_backbone_weights_flag, add_batch_sequences_flag, add_compile_flag,
                     add_data_root_flags, add_device_flag, add_fast_flag,
                     add_num_aug_flag, add_precision_flag, add_seed_flag, add_threshold_flag, int_at_least, run)


# ---------------------------------------------------------------------------------------------
# Command line


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Run G-FRTM (or FRTM) on a benchmark: label PNGs, J&F (where ground truth exists), "
                    "FPS and reuse rate; the evaluation server's zip where it does not. Under torchrun the "
                    "sequences are shared among the processes. With --score, a results folder of any method is "
                    "scored instead, without a model.",
        epilog="Results: <output root>/result/<dset>-<model stem>_<TH>[_fast]/<sequence>/<frame>.png, with "
               "results.json and results.csv beside the sequence folders. Errors in the input (missing files, "
               "corrupt frames, a checkpoint that does not fit) stop with one line naming the path or flag; "
               "sequences finished before stay valid, and --resume continues.")
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=str, default=None,
                   help="checkpoint (released G-FRTM / FRTM .pth, or ours): a path, or a file name looked up in "
                        "--models-dir (default: the only checkpoint in --models-dir); or a folder written by "
                        "export.py, run by onnxruntime (docs/deployment.md: its --num-aug, --seed, --fast and "
                        "--backbone-weights are those it was exported with)")
    g.add_argument("--models-dir", type=Path, default=None,
                   help="where --model names are looked up (default: $RVOS_MODELS, else ./weights)")
    g.add_argument("--ftext", choices=("resnet18", "resnet101"), default=None,
                   help="feature extractor (backbone); checked against the checkpoint, inferred from it when "
                        "omitted")
    add_backbone_weights_flag(g)
    add_num_aug_flag(g, default=5)
    add_fast_flag(g)
    add_threshold_flag(g, several=True)
    g.add_argument("--timing-runs", type=int_at_least(0), default=3,
                   help="with several --TH: timed runs over all thresholds in turn, after the results are written; "
                        "curve.csv's FPS are their medians (default 3; 0: each threshold's own results run)")
    add_seed_flag(g)
    add_device_flag(g)
    add_precision_flag(g)
    add_batch_sequences_flag(g)
    add_compile_flag(g)

    g = parser.add_argument_group("data")
    g.add_argument("--dset", choices=tuple(PRESETS), default="dv2016val", metavar="DSET",
                   help="the benchmark (default: dv2016val): "
                        + "; ".join(f"{name}: {preset.help}" for name, preset in PRESETS.items()))
    add_data_root_flags(g, ("davis", "ytvos", "mose", "lvos"))
    g.add_argument("--data-root", type=Path, default=None,
                   help="davis-layout / ytvos-layout: a folder with JPEGImages/[480p/]<video>/<frame>.jpg (or "
                        ".jpeg, .png) and Annotations/[480p/]<video>/<frame>.png, e.g. your own annotated videos")
    g.add_argument("--split-file", type=Path, default=None,
                   help="file listing the videos to use, one per line: YouTube-VOS (default: "
                        "dataset/splits/ytvos_jjvalid.txt for yt2018jjval*, every valid video for yt2018val* / "
                        "yt2019val*) and davis-layout / ytvos-layout (default: ImageSets/2017/val.txt if present, "
                        "else every folder of JPEGImages)")
    g.add_argument("--sequences", nargs="+", default=None, metavar="SEQ",
                   help="run (and score) only these sequences (space or comma separated); they are recomputed "
                        "even when already finished")
    g.add_argument("--resume", action="store_true",
                   help="skip sequences already finished in the results directory with the same settings "
                        "(their PNGs and timings are reused); the metrics still cover every requested sequence")

    g = parser.add_argument_group("scoring a results folder (no model)")
    g.add_argument("--score", type=Path, default=None, metavar="RESULTS_DIR",
                   help="score this folder of <sequence>/<frame>.png label PNGs (any method's results) against "
                        "--dset's ground truth instead of running a model (--model not needed); writes results.json "
                        "and results.csv into it. Presets with public ground truth only")

    g = parser.add_argument_group("output")
    g.add_argument("--output-root", type=Path, default=None,
                   help="results go to <output root>/result/... (default: $RVOS_OUTPUT, else .)")
    return parser


# ---------------------------------------------------------------------------------------------
# Main


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The parsed flags as the library's evaluation config (each flag's destination is a field)."""
    return EvalConfig(**vars(args))


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation described by parsed arguments (evaluation.run.evaluate): in this process,
    or as one rank of `torchrun --nproc_per_node=N evaluate.py ...`. Returns the results dict
    (as written to results.json; {} on ranks other than 0). Raises FileNotFoundError /
    UsageError naming the path or flag at fault. With --score: evaluation.score.score_results."""
    config = config_from_args(args)
    if config.score is not None:
        return score_results(config)
    return evaluate(config, open_exported=open_exported)


def open_exported(folder: Path):
    """The tracker of an exported folder (--model DIR): deploy.ExportedTracker, onnxruntime's
    CPU provider with its default threads."""
    try:
        from deploy import ExportedTracker
    except ImportError as exc:
        raise UsageError(f"--model {folder} is an exported folder, which needs onnxruntime: pip install -r "
                         f"deploy/requirements.txt ({exc})") from exc
    return ExportedTracker(folder)


if __name__ == "__main__":
    run(main, get_parser(), kept="finished sequences are kept; continue with --resume")
