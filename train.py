"""Train G-FRTM (SPEC §8), as upstream:

    python train.py --name x --ftext resnet18 --dset all --dev cuda:0 --m1 1.0 --m2 0

Multi-GPU (or several CPU processes): torchrun --nproc_per_node=N train.py ...
Checkpoints: <checkpoints>/<name>/<name>_epNNNN.pth after every epoch; a run with the same
--name resumes from the newest one (or from --resume PATH).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from dataset.synthetic import make_davis_like
from dataset.training import build_sources
from lib.cli import int_at_least, positive_float, resolve_device, run
from models.backbone import Backbone
from models.checkpoint import load_network_state, network_state, read_checkpoint
from models.network import GFRTM
from trainers.gfrtm_step import GateLossConfig, GFRTMStep
from trainers.tmcache import TargetModelCache
from trainers.trainer import Trainer, setup_distributed


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be HxW, e.g. 480x854, got {text!r}")
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32x32, got {text!r}")
    return h, w


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train G-FRTM (Reuse-VOS).")
    p.add_argument("--name", type=str, default="All_RN18_m1000_b8seq6",
                   help="training session name: subdirectory of --checkpoints and --tensorboard")
    p.add_argument("--ftext", choices=["resnet18", "resnet101"], default="resnet18", help="backbone")
    p.add_argument("--dset", choices=["all", "dv2017", "ytvos2018", "yt2018", "synthetic"], default="all",
                   help="training data: dv2017 (DAVIS 2017 train), ytvos2018 / yt2018 (YouTube-VOS 2018 jjtrain), "
                        "all (both), synthetic (a generated DAVIS-layout set, see --synthetic-root)")
    p.add_argument("--dev", type=str, default=None, help="device, e.g. cuda:0 or cpu (default: cuda:0 if available)")
    p.add_argument("--m1", type=float, default=1.0,
                   help="gate margin m1 (upstream: 1.0 for DAVIS, 0.5 for YouTube-VOS); logged, applied only "
                        "with --apply-margin, as upstream")
    p.add_argument("--m2", type=float, default=0.0, help="gate margin m2: gate-loss errors below it are ignored")
    p.add_argument("--marginEp", type=int_at_least(1), default=120,
                   help="epochs over which the m1 margin ramps up (margin = m1 * min(1, epoch / marginEp))")
    p.add_argument("--apply-margin", action="store_true",
                   help="apply the margin as a floor on the gate's IoU target (upstream computed it but discarded it)")
    p.add_argument("--initPth", type=Path, default=None,
                   help="initialize from a G-FRTM or FRTM checkpoint (FRTM: decoder and upsampler only)")
    p.add_argument("--resume", type=Path, default=None,
                   help="resume from this checkpoint (default: the newest one of --name, if any)")
    p.add_argument("--davis-root", type=str, default=os.environ.get("DAVIS_ROOT"),
                   help="DAVIS root (default $DAVIS_ROOT)")
    p.add_argument("--ytvos-root", type=str, default=os.environ.get("YTVOS_ROOT"),
                   help="YouTube-VOS 2018 root (default $YTVOS_ROOT)")
    p.add_argument("--ytvos-split-file", type=str, default=None,
                   help="YouTube-VOS training video list (default: the bundled dataset/splits/ytvos_jjtrain.txt)")
    p.add_argument("--synthetic-root", type=Path, default=Path("./save_dir/synthetic"),
                   help="--dset synthetic: DAVIS-layout data set, generated there (seeded by --seed) if missing")
    p.add_argument("--checkpoints", type=Path, default=Path(os.environ.get("RVOS_CHECKPOINTS", "./save_dir")),
                   help="checkpoint root (default ./save_dir or $RVOS_CHECKPOINTS); checkpoints go to <root>/<name>/")
    p.add_argument("--tensorboard", type=Path, default=Path(os.environ.get("RVOS_TENSORBOARD", "./save_dir")),
                   help="TensorBoard root (default ./save_dir or $RVOS_TENSORBOARD); logs go to <root>/<name>/")
    p.add_argument("--tmcache", type=Path, default=Path(os.environ.get("RVOS_TMCACHE", "./save_dir")),
                   help="target-model cache root (default ./save_dir or $RVOS_TMCACHE); entries under "
                        "<root>/<backbone>-c32_gTrue/ (upstream's layout: its released cache can be used)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("RVOS_CACHE", "./save_dir/cache")),
                   help="writable cache for data-set metadata (object visibility); default ./save_dir/cache")
    p.add_argument("--size", type=_size, default=(480, 854), help="training image size HxW (default 480x854)")
    p.add_argument("--epochs", type=int_at_least(1), default=260, help="epochs (default 260)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="samples per batch and process (default 8)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="Adam learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="weight decay, except the gate head's (0)")
    p.add_argument("--lr-step", type=int_at_least(1), default=127, help="StepLR step in epochs (default 127)")
    p.add_argument("--lr-gamma", type=positive_float, default=0.1, help="StepLR factor (default 0.1)")
    p.add_argument("--samples-per-epoch", type=int_at_least(1), default=None,
                   help="cap the samples of an epoch (default: upstream's, 8 per DAVIS object and 4000 YouTube-VOS)")
    p.add_argument("--num-aug", type=int_at_least(1), default=15,
                   help="first-frame augmentations for training cached target models (default 15)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm (default 0: off, as upstream)")
    p.add_argument("--workers", type=int_at_least(0), default=4, help="data-loader worker processes (default 4)")
    p.add_argument("--backbone-weights", type=str, default="imagenet",
                   help="backbone weights: imagenet (torchvision, cached), a path, or random (tests only)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization, sampling and augmentation")
    return p


def build_network(args) -> GFRTM:
    """A fresh network (the gate's last bias as upstream: reuse 0.1, compute 2.0), optionally
    initialized from --initPth."""
    net = GFRTM(args.ftext)
    with torch.no_grad():
        net.reuse_gate.conv2.bias.copy_(torch.tensor([0.1, 2.0]))
    if args.initPth is not None:
        state, backbone, has_gate = network_state(read_checkpoint(args.initPth))
        if backbone != args.ftext:
            raise ValueError(f"--initPth {args.initPth} was trained with {backbone}, not --ftext {args.ftext}")
        if not has_gate:  # FRTM: decoder and upsampler only, the gate parts stay fresh
            state = {**{k: v for k, v in net.state_dict().items() if k not in state}, **state}
        load_network_state(net, state)
        print(f"initialized from {args.initPth} ({'G-FRTM' if has_gate else 'FRTM: decoder and upsampler'})")
    return net


def build_optimizer(network: GFRTM, args):
    """Adam (amsgrad) with weight decay except on the gate head, and StepLR, as upstream."""
    gate_params = list(network.reuse_gate.parameters())
    other_params = [p for n, p in network.named_parameters() if not n.startswith("reuse_gate.")]
    optimizer = torch.optim.Adam([{"params": gate_params, "weight_decay": 0.0},
                                  {"params": other_params, "weight_decay": args.weight_decay}],
                                 lr=args.lr, betas=(0.9, 0.999), amsgrad=True)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)


def main(args) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    rank, world, dev = setup_distributed(args.dev)
    device, description = resolve_device(dev)
    if rank == 0:
        print(f"device: {description}; {world} process(es)")
    torch.manual_seed(args.seed)  # the fresh network's initialization, the same on every process

    davis_root = args.davis_root
    if args.dset == "synthetic":
        davis_root = str(args.synthetic_root)
        if not (args.synthetic_root / "ImageSets").is_dir():
            if rank == 0:
                print(f"writing the synthetic training set to {args.synthetic_root}")
                make_davis_like(args.synthetic_root, num_sequences=1, num_frames=12, size=args.size,
                                num_objects=2, seed=args.seed, num_train_sequences=3)
            if world > 1:
                torch.distributed.barrier()
    sources = build_sources(args.dset, davis_root, args.ytvos_root, args.cache_dir,
                            ytvos_split_file=args.ytvos_split_file)

    backbone = Backbone(args.ftext, args.backbone_weights, seed=args.seed).to(device)
    network = build_network(args).to(device)
    step = GFRTMStep(network, backbone, GateLossConfig(args.m1, args.m2, args.marginEp, args.apply_margin))
    optimizer, scheduler = build_optimizer(network, args)
    cache = TargetModelCache(args.tmcache, backbone, device, num_aug=args.num_aug, seed=args.seed,
                             read_only=rank != 0)
    trainer = Trainer(step, optimizer, scheduler, sources, cache, args, device, args.checkpoints / args.name,
                      args.tensorboard / args.name, rank, world)
    trainer.resume(args.resume)
    stats = trainer.train()
    if world > 1:
        torch.distributed.destroy_process_group()
    return stats


if __name__ == "__main__":
    run(main, get_parser(), interrupted="interrupted: resume with the same command (the last epoch's checkpoint is kept)")
