"""Training throughput (a benchmark, not a test): samples/s of one training step (forward,
backward, optimizer step) on a fixed batch, ours (one backward over the summed per-frame losses)
next to upstream's way (a backward after every frame, each one back through the recurrent
decoder state of all earlier frames, with retain_graph), and their ratio. Both give the same
gradients: the largest difference is printed (tests/test_train_step_golden.py pins them to
upstream's). Random weights, a synthetic batch, cached-target-model settings (c = 32). The two
ways alternate step by step in one run and each time is a median: no timing is stored.

    python -m benchmarks.train_speed [--size 240x427] [--batch 2] [--frames 6] [--steps 3] [--dev cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lib.cli import add_device_flag, add_threads_flag, cpu_threads, image_size, resolve_device
from models.backbone import Backbone
from models.network import GFRTM
from models.target_model import TargetModel, TargetModelConfig
from trainers.gfrtm_step import GateLossConfig, GFRTMStep


def make_batch(batch: int, frames: int, size: tuple[int, int], device):
    """Random images, and a box per sample drifting from frame to frame."""
    g = torch.Generator().manual_seed(0)
    h, w = size
    images = [torch.randint(0, 255, (batch, 3, h, w), generator=g).float().to(device) for _ in range(frames)]
    labels = []
    for t in range(frames):
        m = torch.zeros(batch, 1, h, w)
        m[:, :, h // 4 + 2 * t:h // 2 + 2 * t, w // 4:w // 2 + 3 * t] = 1
        labels.append(m.to(device))
    return images, labels


def train_step(step: GFRTMStep, optimizer, images, labels, targets, per_frame: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    if per_frame:  # upstream: loss.backward(retain_graph=True) after each frame
        for loss, _, _ in step.frame_losses(images, labels, targets, 1):
            loss.backward(retain_graph=True)
    else:
        loss, _ = step.loss(images, labels, targets, 1)
        loss.backward()
    optimizer.step()


def step_seconds(step, optimizer, images, labels, targets, steps: int, device) -> dict[str, float]:
    """Median seconds per training step of each way ("ours", "upstream"), the two alternating step
    by step (so a shared machine's drift hits both alike), after one warm-up step of each."""
    times = {"ours": [], "upstream": []}
    for i in range(steps + 1):
        for name in times:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            train_step(step, optimizer, images, labels, targets, per_frame=name == "upstream")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def gradients(step, images, labels, targets, per_frame: bool) -> dict:
    optimizer = torch.optim.SGD(step.network.parameters(), lr=0.0)
    train_step(step, optimizer, images, labels, targets, per_frame)
    return {k: p.grad.clone() for k, p in step.network.named_parameters()}


def main(args: argparse.Namespace) -> None:
    with cpu_threads(args.threads):
        _measure(args)


def _measure(args: argparse.Namespace) -> None:
    device, _ = resolve_device(args.dev)
    h, w = args.size
    images, labels = make_batch(args.batch, args.frames, (h, w), device)
    backbone = Backbone(args.ftext, "random", seed=0).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = GFRTM(args.ftext)
    with torch.no_grad():
        net.reuse_gate.conv2.bias.copy_(torch.tensor([args.reuse_bias, 2.0]))
    net = net.to(device).train()
    step = GFRTMStep(net, backbone, GateLossConfig())
    targets = []
    for b in range(args.batch):
        tm = TargetModel(backbone.channels["layer4"], TargetModelConfig.training(), device, seed=b)
        with torch.no_grad():
            tm.initialize(backbone(images[0][b:b + 1])["layer4"], labels[0][b:b + 1])
        targets.append(tm)

    ours_grads = gradients(step, images, labels, targets, False)
    upstream_grads = gradients(step, images, labels, targets, True)
    # Relative to the largest gradient entry of all parameters (some tensors, e.g. a conv bias
    # followed by batch norm, have gradients that are only rounding noise).
    scale = max(g.abs().max().item() for g in upstream_grads.values())
    diff = max((ours_grads[k] - upstream_grads[k]).abs().max().item() for k in ours_grads) / scale

    with torch.no_grad():
        reuse_rate = step.loss(images, labels, targets, 1)[1]["reuse_rate"]
    optimizer = torch.optim.Adam(net.parameters(), lr=0.0, amsgrad=True)  # lr 0: the same batch each step
    seconds = step_seconds(step, optimizer, images, labels, targets, args.steps, device)
    ours, upstream = seconds["ours"], seconds["upstream"]
    print(f"{args.ftext}, {h}x{w}, batch {args.batch} x {args.frames} frames, {device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}; gate reuse rate {reuse_rate:.2f}")
    print(f"ours (one backward):        {args.batch / ours:8.3f} samples/s  ({ours:.3f} s/step)")
    print(f"upstream-style (per frame): {args.batch / upstream:8.3f} samples/s  ({upstream:.3f} s/step)")
    print(f"speed-up: {upstream / ours:.2f}x; largest gradient difference: {diff:.1e} of the largest gradient")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=image_size(32), default=(240, 427), help="training image size HxW (upstream trains at 480x854)")
    p.add_argument("--ftext", choices=["resnet18", "resnet101"], default="resnet18", help="backbone")
    p.add_argument("--batch", type=int, default=2, help="samples per batch (upstream: 8)")
    p.add_argument("--frames", type=int, default=6, help="frames per sample (upstream: 6)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each way, alternating (after one warm-up step each); medians")
    p.add_argument("--reuse-bias", type=float, default=0.1,
                   help="initial reuse logit bias of the gate (upstream 0.1 vs 2.0 for compute: mostly computing)")
    add_device_flag(p)
    add_threads_flag(p, default=None)
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
