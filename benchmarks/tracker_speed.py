"""Tracker speed and FLOPs per frame, all-computed vs all-reused (not a test).

    python -m benchmarks.tracker_speed [--size 480x854] [--frames 8] [--dev cpu] [--threads 2]

For each backbone and object count it forces the reuse gate (its last bias set to +-100, so
template matching and the gate still run) and prints ms/frame (frames after the first, target
model updates included), GFLOPs per frame (torch.utils.flop_counter), the reused/computed time
ratio next to the FLOP ratio, and the speed-up over upstream's reference timings measured on
the same kind of 2-core CPU machine (issue #2). Random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dataset.synthetic import render_sequence
from lib.cli import image_size
from models import build_tracker
from models.network import GFRTM

# Upstream Reuse_VOS on a 2-core CPU machine, 480x854, ms/frame (computed, reused).
UPSTREAM_MS = {("resnet18", 1): (403, 338), ("resnet18", 2): (763, 745), ("resnet101", 1): (715, 425)}


def make_frames(num_objects: int, num_frames: int, size: tuple[int, int], seed: int = 1):
    images, labels = render_sequence([seed], num_frames, size, num_objects)
    ids = list(range(1, num_objects + 1))
    return [(torch.from_numpy(images[t]).permute(2, 0, 1).contiguous(),
             torch.from_numpy(labels[t]) if t == 0 else None, ids if t == 0 else [])
            for t in range(num_frames)]


def forced_tracker(backbone: str, reuse: bool, device: str):
    torch.manual_seed(0)
    net = GFRTM(backbone).eval()
    with torch.no_grad():
        net.reuse_gate.conv2.bias.copy_(torch.tensor([100.0, -100.0] if reuse else [-100.0, 100.0]))
    return build_tracker({"model": net.state_dict(), "backbone": backbone}, device=device, num_aug=1,
                         backbone_weights="random")


def measure(backbone: str, num_objects: int, reuse: bool, frames, device: str) -> tuple[float, float]:
    """(ms per frame, GFLOPs per frame) over the frames after the first."""
    tracker = forced_tracker(backbone, reuse, device)
    results = list(tracker.track(frames, threshold=0.5, keep_probabilities=False))
    assert all(all(v == reuse for v in r.reused.values()) for r in results[1:])
    ms = 1000 * float(np.mean([r.seconds for r in results[1:]]))
    # FLOPs on a second run: count everything after the first frame.
    tracker = forced_tracker(backbone, reuse, device)
    stream = tracker.track(frames, threshold=0.5, keep_probabilities=False)
    next(stream)
    with FlopCounterMode(display=False) as counter:
        for _ in stream:
            pass
    return ms, counter.get_total_flops() / 1e9 / (len(frames) - 1)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    h, w = args.size
    print(f"{h}x{w}, {args.frames} frames, device {args.dev}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = (f"{'backbone':<10}{'obj':>4}{'computed ms':>13}{'reused ms':>11}{'computed GF':>13}{'reused GF':>11}"
              f"{'time ratio':>12}{'FLOP ratio':>12}{'vs upstream (comp/reuse)':>27}")
    print(header)
    for backbone, num_objects in args.configs:
        frames = make_frames(num_objects, args.frames, (h, w))
        c_ms, c_gf = measure(backbone, num_objects, False, frames, args.dev)
        r_ms, r_gf = measure(backbone, num_objects, True, frames, args.dev)
        up = UPSTREAM_MS.get((backbone, num_objects))
        vs = f"{up[0] / c_ms:.2f}x / {up[1] / r_ms:.2f}x" if up and (h, w) == (480, 854) else "-"
        print(f"{backbone:<10}{num_objects:>4}{c_ms:>13.0f}{r_ms:>11.0f}{c_gf:>13.1f}{r_gf:>11.1f}"
              f"{r_ms / c_ms:>12.2f}{r_gf / c_gf:>12.2f}{vs:>27}", flush=True)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=image_size(32), default=(480, 854), help="frame size HxW (default 480x854, DAVIS 480p)")
    p.add_argument("--frames", type=int, default=10, help="frames per run, the first one initializes")
    p.add_argument("--dev", default="cpu", help="device, e.g. cpu or cuda:0")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--configs", type=lambda s: [(b, int(n)) for b, n in (c.split(":") for c in s.split(","))],
                   default=[("resnet18", 1), ("resnet18", 2), ("resnet18", 3), ("resnet101", 1), ("resnet101", 3)],
                   help="comma-separated backbone:objects, e.g. resnet18:1,resnet101:3")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
