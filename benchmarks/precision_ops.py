"""Where reduced precision gains and where it does not, per operator (a benchmark, not a test).

    python -m benchmarks.precision_ops [--precision fp32,bf16] [--backbone resnet18] [--size 480x854]
        [--frames 4] [--top 12] [--threads 2]

On the CPU only (on a GPU, `python -m benchmarks.tracker_speed --dev cuda:0 --precision fp32,bf16`
gives the gains).
Profiles computed frames (a seeded random network with the gate forced to compute, one object,
synthetic frames; the first frame, which initializes the target model, is not profiled) once per
precision with torch.profiler, and prints per frame:
* convolutions against everything else: ms in each precision, the speed-up over the first
  precision, and the convolutions' share of the frame;
* the --top convolution shapes by time in the first precision, with their speed-ups.
On a CPU the convolutions' speed-up shows the hardware's bf16 rate over fp32 (AVX512-BF16 has
2 bf16 products per 32-bit lane per instruction, AMX tiles many more), which bounds the frame's.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.tracker_speed import make_frames, random_tracker
from lib.cli import (add_precision_flag, add_random_backbone_flag, add_threads_flag, cpu_threads, image_size,
                     int_at_least, run)

# The CPU kernels aten::convolution dispatches to (oneDNN, or the native fallbacks).
CONV_OPS = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::_nnpack_spatial_convolution",
            "aten::thnn_conv2d")


def profile_frames(precision: str, backbone: str, frames: list[tuple]) -> dict:
    """{"conv": ms/frame, "other": ms/frame, "shapes": {(input CHW, weight shape): ms/frame}}
    over the frames after the first (self CPU time of each operator)."""
    tracker = random_tracker(backbone, "cpu", reuse=False, precision=precision)
    list(tracker.track(frames, threshold=0.5, keep_probabilities=False))  # warm-up
    stream = tracker.track(frames, threshold=0.5, keep_probabilities=False)
    next(stream)  # initialization, not profiled
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in stream:
            pass
    n = len(frames) - 1
    conv = other = 0.0
    shapes: dict[tuple, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1000 / n
        if event.key in CONV_OPS:
            conv += ms
            key = (tuple(event.input_shapes[0][1:]), tuple(event.input_shapes[1]))
            shapes[key] = shapes.get(key, 0.0) + ms
        else:
            other += ms
    return {"conv": conv, "other": other, "shapes": shapes}


def main(args: argparse.Namespace) -> dict:
    with cpu_threads(args.threads):
        return _measure(args)


def _measure(args: argparse.Namespace) -> dict:
    frames = make_frames(1, args.frames, args.size)
    out = {p: profile_frames(p, args.backbone, frames) for p in args.precision}
    ref = args.precision[0]
    h, w = args.size
    print(f"{args.backbone}, {h}x{w}, 1 object, computed frames, {args.frames - 1} profiled, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; ms per frame, speed-up over {ref}")
    print(f"{'':<14}" + "".join(f"{p:>10}{'gain':>7}" for p in args.precision) + f"{'conv share':>14}")
    for part in ("conv", "other"):
        cells = "".join(f"{out[p][part]:>10.1f}{out[ref][part] / max(out[p][part], 1e-9):>6.2f}x" for p in args.precision)
        print(f"{'convolutions' if part == 'conv' else 'everything else':<14}{cells}")
    total = {p: out[p]["conv"] + out[p]["other"] for p in args.precision}
    print(f"{'frame':<14}" + "".join(f"{total[p]:>10.1f}{total[ref] / max(total[p], 1e-9):>6.2f}x"
                                      for p in args.precision)
          + "  " + ", ".join(f"{p} {100 * out[p]['conv'] / max(total[p], 1e-9):.0f}%" for p in args.precision))
    print(f"\ntop {args.top} convolution shapes (input CxHxW, weight) by {ref} time:")
    for key in sorted(out[ref]["shapes"], key=lambda k: -out[ref]["shapes"][k])[:args.top]:
        cells = "".join(f"{out[p]['shapes'].get(key, float('nan')):>10.2f}"
                        f"{out[ref]['shapes'][key] / out[p]['shapes'].get(key, float('nan')):>6.2f}x"
                        for p in args.precision)
        print(f"  {'x'.join(map(str, key[0])):>14} {'x'.join(map(str, key[1])):>14}{cells}")
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_random_backbone_flag(p)
    p.add_argument("--size", type=image_size(32), default=(480, 854), help="frame size HxW (default 480x854)")
    p.add_argument("--frames", type=int_at_least(2), default=4,
                   help="frames per run; the first initializes and is not profiled (default 4)")
    p.add_argument("--top", type=int_at_least(0), default=12, help="convolution shapes to list (default 12)")
    add_threads_flag(p, default=2)
    add_precision_flag(p, several=True, default="fp32,bf16")
    return p


if __name__ == "__main__":
    run(main, get_parser())
