"""Training throughput (not a test): samples/s of one training step on a fixed batch, ours (one
backward over the summed per-frame losses) next to upstream's way (backward after every frame,
each one through the recurrent decoder state of all earlier frames), and their ratio.

    python -m benchmarks.train_speed [--size 240x427] [--batch 2] [--frames 6] [--steps 3] [--dev cpu]

Both compute the same gradients (tests/test_train_step_golden.py pins them); random weights.
"""
from __future__ import annotations

import argparse
import time

import torch

from models.backbone import Backbone
from models.network import GFRTM
from models.target_model import TargetModel, TargetModelConfig
from trainers.gfrtm_step import GateLossConfig, GFRTMStep


def make_batch(batch: int, frames: int, size: tuple[int, int], device):
    g = torch.Generator().manual_seed(0)
    h, w = size
    images = [torch.randint(0, 255, (batch, 3, h, w), generator=g).float().to(device) for _ in range(frames)]
    labels = []
    for t in range(frames):
        m = torch.zeros(batch, 1, h, w)
        m[:, :, h // 4 + t:h // 2 + t, w // 4:w // 2 + 2 * t] = 1
        labels.append(m.to(device))
    return images, labels


def time_steps(step: GFRTMStep, optimizer, images, labels, targets, steps: int, per_frame: bool, device) -> float:
    """Seconds per training step (forward, backward, optimizer step), after one warm-up step."""
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        if per_frame:  # upstream: loss.backward(retain_graph=True) after each frame
            for loss, _, _ in step.frame_losses(images, labels, targets, 1):
                loss.backward(retain_graph=True)
        else:
            loss, _, _ = step.loss(images, labels, targets, 1)
            loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.dev)
    h, w = (int(v) for v in args.size.lower().split("x"))
    images, labels = make_batch(args.batch, args.frames, (h, w), device)
    backbone = Backbone("resnet18", "random", seed=0).to(device)
    torch.manual_seed(0)
    net = GFRTM("resnet18").to(device).train()
    step = GFRTMStep(net, backbone, GateLossConfig())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-9, amsgrad=True)  # tiny lr: the same batch each step
    targets = []
    for b in range(args.batch):
        tm = TargetModel(256, TargetModelConfig.training(), device, seed=b)
        tm.initialize(backbone(images[0][b:b + 1])["layer4"], labels[0][b:b + 1])
        targets.append(tm)
    ours = time_steps(step, optimizer, images, labels, targets, args.steps, False, device)
    upstream = time_steps(step, optimizer, images, labels, targets, args.steps, True, device)
    print(f"{h}x{w}, batch {args.batch} x {args.frames} frames, {device}, torch {torch.__version__}")
    print(f"ours (one backward):            {args.batch / ours:7.2f} samples/s  ({ours:.2f} s/step)")
    print(f"upstream-style (per-frame):     {args.batch / upstream:7.2f} samples/s  ({upstream:.2f} s/step)")
    print(f"speed-up: {upstream / ours:.2f}x")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="240x427", help="training image size HxW (upstream trains at 480x854)")
    p.add_argument("--batch", type=int, default=2, help="samples per batch")
    p.add_argument("--frames", type=int, default=6, help="frames per sample (upstream: 6)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--dev", default="cpu", help="device, e.g. cpu or cuda:0")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
