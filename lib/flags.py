"""The flags several scripts take, each declared here once with one help text, and the argparse
types of the reuse threshold. Imports no PyTorch (only `lib.argtypes`), so that the runtime
without PyTorch (`python -m deploy`) declares its flags here too; `lib.cli` re-exports them for
the scripts, beside the flags that need PyTorch (`--precision`) and the error handling of `run`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from lib.argtypes import int_at_least, max_size, number_in


# The reuse threshold TH (upstream parsed it as a string).
threshold = number_in(0.0, 1.0, " (reuse iff p_reuse > TH; 1 never reuses)")


def threshold_list(text: str) -> float | tuple[float, ...]:
    """argparse type: one threshold (a float, as `threshold`) or a comma-separated list of
    distinct thresholds (a tuple, in the order given), e.g. 1.0,0.9,0.8."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be a threshold in [0, 1] or a comma-separated list of them, "
                                         f"got {text!r}")
    values = tuple(threshold(p) for p in parts)
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"lists a threshold twice: {text!r}")
    return values[0] if len(values) == 1 else values


threshold_list.__name__ = "threshold or comma-separated thresholds"


# ---------------------------------------------------------------------------------------------
# Flags several scripts take: each declared here once, with one help text.


def add_device_flag(parser) -> None:
    """--dev (evaluate.py, demo.py, train.py)."""
    parser.add_argument("--dev", type=str, default=None,
                        help="torch device, e.g. cuda:0 or cpu (default: cuda:0 if CUDA is available, else cpu); "
                             "under torchrun each process uses cuda:LOCAL_RANK, or the CPU with --dev cpu")


def add_seed_flag(parser) -> None:
    """--seed (evaluate.py, demo.py, train.py)."""
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of everything random in the run: first-frame augmentations and target-model "
                             "initialization; in training also the network's initialization and the samples and "
                             "their order; a random backbone (default 0). The global RNGs are left alone")


def add_backbone_weights_flag(parser) -> None:
    """--backbone-weights (evaluate.py, demo.py, train.py)."""
    parser.add_argument("--backbone-weights", type=str, default="imagenet",
                        help="ResNet backbone weights: 'imagenet' (torchvision IMAGENET1K_V1, downloaded once and "
                             "cached), a path to a torchvision ResNet state dict, or 'random' (seeded by --seed; "
                             "tests only: meaningless results) (default: imagenet)")


def add_random_backbone_flag(parser) -> None:
    """--backbone of the benchmarks' seeded random networks."""
    parser.add_argument("--backbone", choices=("resnet18", "resnet101"), default="resnet18",
                        help="backbone of the seeded random network (default resnet18)")


def add_num_aug_flag(parser, default: int) -> None:
    """--num-aug (evaluate.py and demo.py: 5, as upstream evaluates; train.py: 15, as upstream
    trains its cached target models)."""
    parser.add_argument("--num-aug", type=int_at_least(1), default=default,
                        help="first-frame images a target model is trained on: the frame and its augmentations; "
                             "1 = the frame alone (default %(default)s)")


def add_fast_flag(parser) -> None:
    """--fast / --no-fast (evaluate.py, export.py): the target models' optimizer settings."""
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                        help="fewer target-model optimizer steps, as upstream always evaluated (default: --fast)")


def add_threads_flag(parser, default: Optional[int], why: str = "", runtime: str = "torch") -> None:
    """--threads (demo.py's main job: 2; the benchmarks: 2, train_speed None = torch's choice;
    python -m deploy: None = onnxruntime's choice, with `runtime` "onnxruntime"). A torch script
    runs its work inside `cpu_threads(args.threads)`; the runtime gives it to its sessions."""
    sets = {"torch": "torch.set_num_threads", "onnxruntime": "onnxruntime's intra-op threads"}[runtime]
    shown = f"{runtime}'s choice, every core" if default is None else str(default)
    parser.add_argument("--threads", type=int_at_least(1), default=default,
                        help=f"CPU threads ({sets}){why} (default: {shown})")


def add_batch_sequences_flag(parser) -> None:
    """--batch-sequences (evaluate.py; demo.py's main job): EvalConfig.batch_sequences."""
    parser.add_argument("--batch-sequences", type=int_at_least(1), default=1, metavar="B",
                        help="track B sequences at a time in lockstep: their frames go through the backbone, "
                             "template matching, reuse gate and decoder together (the same PNGs as 1, up to float "
                             "rounding; docs/evaluation.md) (default 1: one sequence at a time)")


# A benchmark's root flag -> its help; None in the arguments means the environment variable.
DATA_ROOT_HELP = {
    "davis": "DAVIS root with JPEGImages/480p, Annotations/480p, ImageSets/ (default: $DAVIS_ROOT)",
    "ytvos": "YouTube-VOS 2018 root with train/, train_all_frames/, valid/, valid_all_frames/ (each split that is "
             "used) (default: $YTVOS_ROOT)",
    "mose": "MOSE root with valid/ and/or train/, each holding JPEGImages/ and Annotations/ (mose-val, mose-train) "
            "(default: $MOSE_ROOT)",
    "lvos": "LVOS (v1 or v2) root with valid/JPEGImages/, valid/Annotations/ and the meta JSON "
            "valid/valid_meta.json, or that valid/ folder itself (lvos-val) (default: $LVOS_ROOT)",
}


def add_data_root_flags(parser, benchmarks: tuple[str, ...] = ("davis", "ytvos")) -> None:
    """--davis-root, --ytvos-root (evaluate.py, train.py), --mose-root, --lvos-root (evaluate.py):
    --<benchmark>-root for each of `benchmarks`; None: the environment variable."""
    for name in benchmarks:
        parser.add_argument(f"--{name}-root", type=Path, default=None, help=DATA_ROOT_HELP[name])


def add_threshold_flag(parser, several: bool = False) -> None:
    """--TH, alias --tau (evaluate.py, demo.py, the benchmarks); with `several` it also takes a
    comma-separated list (then args.TH is a float, or a tuple for a list)."""
    parser.add_argument("--TH", "--tau", dest="TH", type=threshold_list if several else threshold, default=0.7,
                        metavar="TH",
                        help="reuse-gate threshold tau in [0, 1]: an object reuses the previous frame's result "
                             "when its reuse probability exceeds TH; 1.0 never reuses (plain FRTM) "
                             "(default: 0.7, upstream's)" + (
                                 "; a comma-separated list, e.g. 1.0,0.9,0.8,0.7,0.6, is a threshold sweep: each "
                                 "evaluated into its own results directory, then timed in turn, with curve.csv and "
                                 "curve.png (J&F against FPS and GFLOPs per frame) in <output root>/result/<dset>-"
                                 "<model stem>_curve[_fast]/ (evaluate.py; demo.py: its main job, with TH 1.0, "
                                 "the goals checked at the first)" if several else ""))


def add_compile_flag(parser) -> None:
    """--compile (evaluate.py, demo.py, benchmarks.tracker_speed)."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the tracker's per-frame regions (inductor; CUDA graphs on CUDA): the "
                             "first frames of each new frame size or object count compile (minutes on a CPU, "
                             "printed to stderr; the cache in $TORCHINDUCTOR_CACHE_DIR, default "
                             "~/.cache/reuse-vos/inductor, makes later runs start warm); docs/performance.md "
                             "(default: off, eager)")


def add_max_size_flag(parser) -> None:
    """--max-size (demo.py --video, python -m deploy): the tracking size of one's own video."""
    parser.add_argument("--max-size", type=max_size, default=480,
                        help="frames whose shorter side exceeds this many pixels are tracked at that shorter "
                             "side (INTER_AREA), the masks resized back (nearest) to the frame size (default "
                             "480, like DAVIS 480p; 0 = never resize)")


def add_video_flag(parser) -> None:
    """--video (demo.py --video, python -m deploy): one's own video."""
    parser.add_argument("--video", type=Path, required=True,
                        help="video to segment: an MP4 (any file OpenCV decodes; frames are named 00000, "
                             "00001, ...) or a folder of JPG/PNG frames sorted by name (frames named by "
                             "their file stems)")


def add_mask_flag(parser) -> None:
    """--mask (demo.py --video, python -m deploy): the objects' first masks."""
    parser.add_argument("--mask", type=Path, required=True,
                        help="label PNG of the first frame (pixel value = object id, e.g. a DAVIS palette "
                             "PNG; 0 = background), or a folder of label PNGs named like the frames (for an "
                             "MP4: by frame number, 00012.png): an object starts at the first PNG holding "
                             "its id. Masks need the frame's aspect ratio, any size (resized nearest)")
