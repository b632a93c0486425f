"""Train G-FRTM as upstream (docs/training.md):

    python train.py --name x --ftext resnet18 --dset all --dev cuda:0 --m1 1.0 --m2 0

Several GPUs (or CPU processes): torchrun --nproc_per_node=N train.py ... (DistributedDataParallel:
nccl on CUDA, gloo on the CPU; checkpoints and logs by rank 0 only).
Checkpoints: <checkpoints>/<name>/<name>_epNNNN.pth after every epoch (written atomically); a run
with the same --name resumes from the newest one (or from --resume PATH).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from dataset.training import SAMPLE_SIZE
from lib.cli import (add_backbone_weights_flag, add_data_root_flags, add_device_flag, add_num_aug_flag,
                     add_precision_flag, add_seed_flag, image_size, int_at_least, positive_float, run)
from trainers.trainer import TrainConfig, run_training


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def get_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description="Train G-FRTM (Reuse-VOS). Multi-GPU: torchrun --nproc_per_node=N train.py ...")
    p.add_argument("--name", type=str, default="All_RN18_m1000_b8seq6",
                   help="training session name: subdirectory of --checkpoints and --tensorboard (default as upstream)")
    p.add_argument("--ftext", choices=["resnet18", "resnet101"], default="resnet18", help="backbone (default resnet18)")
    p.add_argument("--dset", choices=["all", "dv2017", "ytvos2018", "yt2018", "synthetic"], default="all",
                   help="training data: dv2017 (DAVIS 2017 train), ytvos2018 / yt2018 (YouTube-VOS 2018 jjtrain), "
                        "all (both, default), synthetic (a generated DAVIS-layout set, see --synthetic-root)")
    p.add_argument("--m1", type=float, default=1.0,
                   help="gate margin m1 (upstream: 1.0 for DAVIS, 0.5 for YouTube-VOS): margin = m1 * min(1, epoch / "
                        "marginEp), logged; applied as a floor on the gate's IoU target only with --apply-margin")
    p.add_argument("--m2", type=non_negative_float, default=0.0,
                   help="gate margin m2: gate-loss errors below it are ignored (default 0)")
    p.add_argument("--marginEp", type=int_at_least(1), default=120,
                   help="epochs over which the m1 margin ramps up (default 120)")
    p.add_argument("--apply-margin", action="store_true",
                   help="apply the m1 margin as a floor on the gate's IoU target (upstream computed it but discarded "
                        "it, so the released weights were trained without it)")
    p.add_argument("--initPth", type=Path, default=None,
                   help="initialize from a G-FRTM checkpoint (all of it) or an FRTM checkpoint (decoder and "
                        "upsampler; the rest fresh); a checkpoint to resume from takes precedence")
    p.add_argument("--resume", type=Path, default=None,
                   help="resume from this training checkpoint (default: the newest in <checkpoints>/<name>/, if any)")
    add_data_root_flags(p)
    p.add_argument("--ytvos-split-file", type=str, default=None,
                   help="YouTube-VOS training video list (default: the bundled dataset/splits/ytvos_jjtrain.txt)")
    p.add_argument("--synthetic-root", type=Path, default=Path("./save_dir/synthetic"),
                   help="--dset synthetic: DAVIS-layout data set, generated there (seeded by --seed) if missing "
                        "(default ./save_dir/synthetic)")
    p.add_argument("--checkpoints", type=Path, default=Path(env("RVOS_CHECKPOINTS", "./save_dir")),
                   help="checkpoint root; checkpoints go to <root>/<name>/ (default ./save_dir or $RVOS_CHECKPOINTS)")
    p.add_argument("--tensorboard", type=Path, default=Path(env("RVOS_TENSORBOARD", "./save_dir")),
                   help="TensorBoard root; logs go to <root>/<name>/ (default ./save_dir or $RVOS_TENSORBOARD)")
    p.add_argument("--tmcache", type=Path, default=Path(env("RVOS_TMCACHE", "./save_dir")),
                   help="target-model cache root; entries under <root>/<backbone>-c32_gTrue/, upstream's layout, so "
                        "its released cache can be used (default ./save_dir or $RVOS_TMCACHE)")
    p.add_argument("--cache-dir", type=Path, default=Path(env("RVOS_CACHE", "./save_dir/cache")),
                   help="writable cache for data-set metadata (object visibility) (default ./save_dir/cache or $RVOS_CACHE)")
    p.add_argument("--size", type=image_size(32), default=(480, 854), help="training image size HxW (default 480x854)")
    p.add_argument("--frames", type=int_at_least(2), default=SAMPLE_SIZE,
                   help=f"frames per sample: the reference frame and frames-1 random others (default {SAMPLE_SIZE})")
    p.add_argument("--epochs", type=int_at_least(1), default=260, help="epochs to train in all (default 260)")
    p.add_argument("--keep-checkpoints", type=int_at_least(1), default=None, metavar="N",
                   help="keep only the newest N epoch checkpoints of the run, deleting older ones after each save "
                        "(default: keep all, as upstream)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8,
                   help="samples per batch and process (default 8)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="Adam (amsgrad) learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-5,
                   help="weight decay, except the reuse gate's (0) (default 1e-5)")
    p.add_argument("--lr-step", type=int_at_least(1), default=127, help="StepLR step in epochs (default 127)")
    p.add_argument("--lr-gamma", type=positive_float, default=0.1, help="StepLR factor (default 0.1)")
    p.add_argument("--samples-per-epoch", type=int_at_least(1), default=None,
                   help="cap the samples of an epoch, over all processes (default: upstream's, 8 per DAVIS object "
                        "and 4000 YouTube-VOS objects)")
    p.add_argument("--clip-grad", type=non_negative_float, default=0.0,
                   help="clip the gradient norm to this (default 0: off, as upstream)")
    p.add_argument("--workers", type=int_at_least(0), default=4, help="data-loader worker processes (default 4)")
    add_device_flag(p)
    add_precision_flag(p)
    add_num_aug_flag(p, default=15)
    add_backbone_weights_flag(p)
    add_seed_flag(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The parsed flags as the library's training config (each flag's destination is a field)."""
    return TrainConfig(**vars(args))


def main(args: argparse.Namespace) -> dict:
    """Train as the parsed flags say (trainers.trainer.run_training); the last epoch's statistics."""
    return run_training(config_from_args(args))


if __name__ == "__main__":
    run(main, get_parser(), kept="the last epoch's checkpoint is kept; resume with the same command")
