"""Train G-FRTM as upstream (docs/training.md):

    python train.py --name x --ftext resnet18 --dset all --dev cuda:0 --m1 1.0 --m2 0

Several GPUs (or CPU processes): torchrun --nproc_per_node=N train.py ... (DistributedDataParallel:
nccl on CUDA, gloo on the CPU; checkpoints and logs by rank 0 only).
Checkpoints: <checkpoints>/<name>/<name>_epNNNN.pth after every epoch (written atomically); a run
with the same --name resumes from the newest one (or from --resume PATH).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from dataset.synthetic import make_davis_like
from dataset.training import SAMPLE_SIZE, build_sources
from lib.cli import (add_backbone_weights_flag, add_data_root_flags, add_device_flag, add_num_aug_flag,
                     add_precision_flag, add_seed_flag, image_size, int_at_least, positive_float, resolve_device, run)
from models.backbone import Backbone
from models.checkpoint import check_backbone, load_network_state, network_state, read_checkpoint
from models.network import GFRTM
from models.precision import check_precision
from trainers.gfrtm_step import GateLossConfig, GFRTMStep
from trainers.tmcache import TargetModelCache
from trainers.trainer import Trainer, setup_distributed

GATE_LAST_BIAS = (0.1, 2.0)  # upstream's initial (reuse, compute) bias: the gate starts mostly computing


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


def build_network(args) -> GFRTM:
    """A fresh network (seeded by --seed without touching the global RNG; the gate's last bias as
    upstream), optionally initialized from --initPth."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        net = GFRTM(args.ftext)
    with torch.no_grad():
        net.reuse_gate.conv2.bias.copy_(torch.tensor(GATE_LAST_BIAS))
    if args.initPth is not None:
        state, backbone, has_gate = network_state(read_checkpoint(args.initPth))
        check_backbone(backbone, args.ftext, f"--initPth {args.initPth}")
        if not has_gate:  # FRTM: decoder and upsampler only, the gate parts stay fresh
            state = {**{k: v for k, v in net.state_dict().items() if k not in state}, **state}
        load_network_state(net, state)
        print(f"initialized from {args.initPth} ({'G-FRTM' if has_gate else 'FRTM: decoder and upsampler'})")
    return net


def build_optimizer(network: GFRTM, args):
    """Adam (amsgrad), weight decay except on the reuse gate, and StepLR, as upstream."""
    gate_params = list(network.reuse_gate.parameters())
    other_params = [p for n, p in network.named_parameters() if not n.startswith("reuse_gate.")]
    optimizer = torch.optim.Adam([{"params": gate_params, "weight_decay": 0.0},
                                  {"params": other_params, "weight_decay": args.weight_decay}],
                                 lr=args.lr, betas=(0.9, 0.999), amsgrad=True)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)


def _rank0_first(fn, rank: int, world: int):
    """Run fn on rank 0 first (it writes caches), then on the others (they read them)."""
    if world > 1 and rank != 0:
        dist.barrier()
    result = fn()
    if world > 1 and rank == 0:
        dist.barrier()
    return result


def main(args) -> dict:
    rank, world, dev = setup_distributed(args.dev)
    # Rank 0 reports; the others only warn (with their rank).
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(message)s" if world == 1 else f"%(levelname)s [rank {rank}] %(message)s")
    try:
        return _train(args, rank, world, dev)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank: int, world: int, dev) -> dict:
    device, description = resolve_device(dev)
    check_precision(args.precision, device)  # before any data is prepared
    if rank == 0:
        print(f"device: {description}; {world} process(es)", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training size, as upstream

    davis_root = args.davis_root
    if args.dset == "synthetic":
        davis_root = str(args.synthetic_root)

        def generate():
            if not (args.synthetic_root / "ImageSets").is_dir():
                print(f"writing the synthetic training set to {args.synthetic_root}", flush=True)
                make_davis_like(args.synthetic_root, num_sequences=1, num_frames=max(12, args.frames + 2),
                                size=args.size, num_objects=2, seed=args.seed, num_train_sequences=3)
        _rank0_first(generate, rank, world)
    sources = _rank0_first(lambda: build_sources(args.dset, davis_root, args.ytvos_root, args.cache_dir, args.size,
                                                 args.frames, ytvos_split_file=args.ytvos_split_file), rank, world)
    if rank == 0:
        print("training data: " + ", ".join(f"{s.name} ({len(s.objects)} objects in {len(s.reference)} sequences)"
                                            for s in sources), flush=True)

    backbone = Backbone(args.ftext, args.backbone_weights, seed=args.seed).to(device)
    network = build_network(args).to(device)
    step = GFRTMStep(network, backbone, GateLossConfig(args.m1, args.m2, args.marginEp, args.apply_margin))
    optimizer, scheduler = build_optimizer(network, args)
    cache = TargetModelCache(args.tmcache, backbone, device, num_aug=args.num_aug, seed=args.seed)
    trainer = Trainer(step, optimizer, scheduler, sources, cache, args, device, args.checkpoints / args.name,
                      args.tensorboard / args.name, rank, world)
    trainer.resume(args.resume)
    return trainer.train()


if __name__ == "__main__":
    run(main, get_parser(), kept="the last epoch's checkpoint is kept; resume with the same command")
