"""Tracker speed, compared side by side within one run (a benchmark, not a test).

    python -m benchmarks.tracker_speed [--size 480x854] [--frames 10] [--repeats 3]
        [--configs resnet18:1,resnet101:1] [--model CKPT --TH 0.7] [--dev cpu] [--threads 2]
        [--precision fp32,bf16] [--compile [--peak-gflops G]]

For each backbone and object count, the same synthetic frames are tracked by
* FRTM: TH 1.0, so no template matching and no gate (plain FRTM);
* computed: the gate runs and is forced to compute (its last bias set to -+100);
* reused: the gate runs and is forced to reuse;
* with --model: that checkpoint at --TH with its own gate decisions, and at TH 1.0.
The runs alternate (FRTM, computed, reused, ..., then again for each repeat), so the drift of a
shared machine hits every variant alike, and each time is the median over the tracked frames
(after the first) of all repeats. Printed: ms/frame, GFLOPs/frame (torch.utils.flop_counter) and
ratios between numbers of this run only: reused vs computed (next to the FLOP ratio), reused vs
FRTM, the gate's overhead (computed vs FRTM), and the checkpoint's speed-up over TH 1.0 with its
reuse rate. With several --precision values every variant runs in each of them (all alternating)
and each row ends with its speed-up over the first precision listed, computed and reused. On
CUDA the rows also give FPS and the peak GPU memory. No reference timing is stored anywhere.

With --compile (docs/performance.md), computed and reused run eager and compiled (models.compiled),
all four alternating; each row gives both times, the compiled speed-up, and the compiled
FLOP/s as a fraction of the device's peak (--peak-gflops, else the default `default_peak` says).
The compiled trackers compile in the warm-up (its time is printed to stderr) and not in the timing.
Random weights unless --model: speed does not depend on them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dataset.synthetic import render_sequence
from lib.cli import (UsageError, add_backbone_weights_flag, add_compile_flag, add_device_flag, add_precision_flag,
                     add_threads_flag, add_threshold_flag, cpu_threads, image_size, positive_float, resolve_device)
from models import build_tracker
from models.network import GFRTM
from models.tracker import Tracker


@dataclass
class Variant:
    """One way of tracking the frames: a tracker and the threshold it runs at."""

    name: str
    tracker: Tracker
    threshold: float
    forced: bool | None = None  # every gate decision must be this (None: the gate decides)
    eager_twin: str | None = None  # compiled: the variant with the same FLOPs, counted there

    @property
    def key(self) -> tuple[str, str]:
        return self.tracker.precision, self.name


def make_frames(num_objects: int, num_frames: int, size: tuple[int, int], seed: int = 1) -> list[tuple]:
    """Synthetic frames in the tracker's format: all objects start on frame 0."""
    images, labels = render_sequence([seed], num_frames, size, num_objects)
    ids = list(range(1, num_objects + 1))
    return [(torch.from_numpy(images[t]).permute(2, 0, 1).contiguous(),
             torch.from_numpy(labels[t]) if t == 0 else None, ids if t == 0 else [])
            for t in range(num_frames)]


def random_tracker(backbone: str, device: torch.device | str, reuse: bool | None = None,
                   precision: str = "fp32", num_aug: int = 1, compile: bool | str = False) -> Tracker:
    """A tracker with seeded random weights; reuse True / False forces every gate decision;
    compile as `build_tracker`'s."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = GFRTM(backbone).eval()
    if reuse is not None:
        with torch.no_grad():
            net.reuse_gate.conv2.bias.copy_(torch.tensor([100.0, -100.0] if reuse else [-100.0, 100.0]))
    return build_tracker({"model": net.state_dict(), "backbone": backbone}, device=device, num_aug=num_aug,
                         backbone_weights="random", precision=precision, compile=compile)


def variants_for(backbone: str, device: torch.device | str, model: str | None, th: float, backbone_weights: str,
                 precision: str = "fp32") -> list[Variant]:
    frtm = random_tracker(backbone, device, precision=precision)
    out = [Variant("FRTM", frtm, 1.0),
           Variant("computed", random_tracker(backbone, device, reuse=False, precision=precision), 0.5, forced=False),
           Variant("reused", random_tracker(backbone, device, reuse=True, precision=precision), 0.5, forced=True)]
    if model is not None:
        trained = build_tracker(model, device=device, num_aug=1, backbone_weights=backbone_weights, ftext=backbone,
                                precision=precision)
        out += [Variant("model TH 1.0", trained, 1.0), Variant(f"model TH {th:g}", trained, th)]
    return out


def compiled_variants_for(backbone: str, device: torch.device | str, precision: str = "fp32") -> list[Variant]:
    """Computed and reused (forced), each eager and compiled."""
    out = []
    for name, reuse in (("computed", False), ("reused", True)):
        out += [Variant(name, random_tracker(backbone, device, reuse=reuse, precision=precision), 0.5, forced=reuse),
                Variant(f"{name} compiled", random_tracker(backbone, device, reuse=reuse, precision=precision,
                                                           compile=True), 0.5, forced=reuse, eager_twin=name)]
    return out


def default_peak(device: torch.device, threads: int) -> tuple[float | None, str]:
    """(peak GFLOP/s, how it was found) when --peak-gflops is not given. CPU: threads x clock
    (/proc/cpuinfo) x 32 fp32 FLOP per cycle (two 256-bit FMA pipes, as AVX2 cores and Zen 4
    have; a core with two 512-bit FMA units peaks twice as high). CUDA: no default."""
    if device.type != "cpu":
        return None, "no default peak off the CPU: pass --peak-gflops"
    try:
        mhz = next(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return None, "no clock in /proc/cpuinfo: pass --peak-gflops"
    return threads * mhz * 32 / 1000, f"{threads} threads x {mhz:.0f} MHz x 32 FLOP/cycle"


def track_once(variant: Variant, frames: list[tuple]) -> tuple[list[float], int, int]:
    """(seconds of each frame after the first, reused object-frames, tracked object-frames)."""
    results = list(variant.tracker.track(frames, threshold=variant.threshold, keep_probabilities=False))
    decisions = [v for r in results[1:] for v in r.reused.values()]
    if variant.forced is not None and any(d != variant.forced for d in decisions):
        raise RuntimeError(f"{variant.name}: the forced gate did not decide {variant.forced} everywhere")
    return [r.seconds for r in results[1:]], sum(decisions), len(decisions)


def gflops_per_frame(variant: Variant, frames: list[tuple]) -> float:
    """GFLOPs per frame over the frames after the first (an untimed run)."""
    stream = variant.tracker.track(frames, threshold=variant.threshold, keep_probabilities=False)
    next(stream)
    with FlopCounterMode(display=False) as counter:
        for _ in stream:
            pass
    return counter.get_total_flops() / 1e9 / (len(frames) - 1)


def measure(variants: list[Variant], frames: list[tuple], repeats: int) -> dict[str, dict[str, dict]]:
    """Alternating runs of all variants -> {precision: {variant name: stats}}, stats: the median
    ms/frame, GFLOPs/frame, reuse rate and, on CUDA, the peak GPU memory in MiB."""
    seconds = {v.key: [] for v in variants}
    reused = {v.key: [0, 0] for v in variants}
    peak = {v.key: 0 for v in variants}
    for v in variants:  # warm-up: first calls allocate and pick kernels
        track_once(v, frames[:2])
    for _ in range(repeats):
        for v in variants:
            cuda = v.tracker.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(v.tracker.device)
            times, n_reused, n_tracked = track_once(v, frames)
            if cuda:
                peak[v.key] = max(peak[v.key], torch.cuda.max_memory_allocated(v.tracker.device) / 2 ** 20)
            seconds[v.key] += times
            reused[v.key][0] += n_reused
            reused[v.key][1] += n_tracked
    out: dict[str, dict[str, dict]] = {}
    for v in variants:
        out.setdefault(v.key[0], {})[v.name] = {
            "ms": 1000 * float(np.median(seconds[v.key])),
            "gflops": None if v.eager_twin else gflops_per_frame(v, frames),
            "reuse_rate": reused[v.key][0] / max(1, reused[v.key][1]), "peak_mib": peak[v.key]}
    for v in variants:
        if v.eager_twin:
            out[v.key[0]][v.name]["gflops"] = out[v.key[0]][v.eager_twin]["gflops"]
    return out


COLUMNS = ("backbone", "obj", "FRTM ms", "comp ms", "reuse ms", "FRTM GF", "comp GF", "reuse GF",
           "reuse/comp", "FLOPs", "FRTM/reuse", "gate cost")
MODEL_COLUMNS = ("TH vs 1.0", "reused")
PRECISION_COLUMNS = ("precision", "comp gain", "reuse gain")
CUDA_COLUMNS = ("comp FPS", "reuse FPS", "peak MiB")
COMPILED_COLUMNS = ("backbone", "obj", "variant", "eager ms", "compiled ms", "speed-up", "GF", "GFLOP/s", "of peak")


def format_row(cells) -> str:
    return f"{cells[0]:<10}" + "".join(f"{c:>12}" for c in cells[1:])


def report_row(backbone: str, num_objects: int, m: dict[str, dict], precision: str | None = None,
               first: dict[str, dict] | None = None, cuda: bool = False) -> str:
    """One table row; with `precision`, also the speed-up over the `first` precision's numbers."""
    frtm, comp, reuse = m["FRTM"], m["computed"], m["reused"]
    cells = ([backbone, num_objects] + [f"{v['ms']:.0f}" for v in (frtm, comp, reuse)]
             + [f"{v['gflops']:.1f}" for v in (frtm, comp, reuse)])
    cells += [f"{reuse['ms'] / comp['ms']:.2f}", f"{reuse['gflops'] / comp['gflops']:.2f}",
              f"{frtm['ms'] / reuse['ms']:.2f}x", f"{comp['ms'] / frtm['ms']:.2f}"]
    trained = [k for k in m if k.startswith("model TH ") and k != "model TH 1.0"]
    if trained:
        base, ours = m["model TH 1.0"], m[trained[0]]
        cells += [f"{base['ms'] / ours['ms']:.2f}x", f"{100 * ours['reuse_rate']:.0f}%"]
    if precision is not None:
        cells += [precision] + [f"{first[k]['ms'] / m[k]['ms']:.2f}x" for k in ("computed", "reused")]
    if cuda:
        cells += [f"{1000 / comp['ms']:.1f}", f"{1000 / reuse['ms']:.1f}",
                  f"{max(v['peak_mib'] for v in m.values()):.0f}"]
    return format_row(cells)


def report_compiled(backbone: str, num_objects: int, m: dict[str, dict], peak: float | None) -> list[str]:
    """Rows of the --compile table: eager and compiled ms/frame, speed-up, compiled GFLOP/s and
    its fraction of the peak."""
    rows = []
    for name in ("computed", "reused"):
        eager, compiled = m[name], m[f"{name} compiled"]
        rate = compiled["gflops"] / compiled["ms"] * 1000
        rows.append(format_row([backbone, num_objects, name, f"{eager['ms']:.0f}", f"{compiled['ms']:.0f}",
                                f"{eager['ms'] / compiled['ms']:.2f}x", f"{compiled['gflops']:.1f}", f"{rate:.1f}",
                                "n/a" if peak is None else f"{100 * rate / peak:.1f}%"]))
    return rows


def main(args: argparse.Namespace) -> dict:
    with cpu_threads(args.threads):
        return _measure_compiled(args) if args.compile else _measure(args)


def _measure_compiled(args: argparse.Namespace) -> dict:
    device, _ = resolve_device(args.dev)
    h, w = args.size
    precision = args.precision[0]
    if len(args.precision) > 1 or args.model:
        raise UsageError("--compile compares eager and compiled at one precision, without --model: "
                         "pass one --precision and leave out --model")
    peak, how = (args.peak_gflops, "--peak-gflops") if args.peak_gflops else default_peak(device, torch.get_num_threads())
    print(f"{h}x{w}, {args.frames} frames x {args.repeats} repeats (eager and compiled alternating, medians), "
          f"device {device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, precision {precision}; peak "
          f"{'n/a' if peak is None else f'{peak:.0f} GFLOP/s'} ({how})")
    print(format_row(COMPILED_COLUMNS))
    measured = {}
    for backbone, num_objects in args.configs:
        frames = make_frames(num_objects, args.frames, (h, w))
        m = measure(compiled_variants_for(backbone, device, precision), frames, args.repeats)[precision]
        measured[(backbone, num_objects, precision)] = m
        for row in report_compiled(backbone, num_objects, m, peak):
            print(row, flush=True)
    print("speed-up: eager ms over compiled ms; GF: GFLOPs per frame (the same computation both ways); "
          "GFLOP/s and peak: the compiled run's")
    return measured


def _measure(args: argparse.Namespace) -> dict:
    device, _ = resolve_device(args.dev)
    h, w = args.size
    precisions = args.precision
    several = len(precisions) > 1
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as evaluate.py and train.py (upstream): autotuned convolutions
    print(f"{h}x{w}, {args.frames} frames x {args.repeats} repeats (alternating, medians), device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if cuda else ''}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, precision {','.join(precisions)}")
    print(format_row(COLUMNS + (MODEL_COLUMNS if args.model else ()) + (PRECISION_COLUMNS if several else ())
                     + (CUDA_COLUMNS if cuda else ())))
    measured = {}
    for backbone, num_objects in args.configs:
        frames = make_frames(num_objects, args.frames, (h, w))
        variants = [v for p in precisions
                    for v in variants_for(backbone, device, args.model, args.TH, args.backbone_weights, p)]
        m = measure(variants, frames, args.repeats)
        for p in precisions:
            measured[(backbone, num_objects, p)] = m[p]
            print(report_row(backbone, num_objects, m[p], p if several else None, m[precisions[0]], cuda), flush=True)
    print("reuse/comp: time of a reused frame over a computed one (FLOPs: the same for FLOPs); FRTM/reuse: speed-up "
          "of a reused frame over plain FRTM; gate cost: a computed frame (gate runs) over FRTM (no gate)"
          + (f"; TH vs 1.0: the checkpoint's speed-up at TH {args.TH:g} over TH 1.0, and its reuse rate"
             if args.model else "")
          + (f"; comp gain, reuse gain: speed-up of computed, reused frames over {precisions[0]}" if several else ""))
    return measured


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=image_size(32), default=(480, 854), help="frame size HxW (default 480x854, DAVIS 480p)")
    p.add_argument("--frames", type=int, default=10, help="frames per run, the first one initializes (default 10)")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating runs of every variant; times are medians over all of them (default 3)")
    add_device_flag(p)
    add_threads_flag(p, default=2)
    p.add_argument("--configs", type=lambda s: [(b, int(n)) for b, n in (c.split(":") for c in s.split(","))],
                   default=[("resnet18", 1), ("resnet18", 2), ("resnet18", 3), ("resnet101", 1), ("resnet101", 3)],
                   help="comma-separated backbone:objects, e.g. resnet18:1,resnet101:3")
    p.add_argument("--model", default=None,
                   help="also time this checkpoint with its own gate at --TH against TH 1.0 on the same frames "
                        "(its backbone from --backbone-weights)")
    add_threshold_flag(p)
    add_backbone_weights_flag(p)
    add_precision_flag(p, several=True)
    add_compile_flag(p)
    p.add_argument("--peak-gflops", type=positive_float, default=None,
                   help="with --compile: the device's peak GFLOP/s, to print the compiled FLOP/s as a fraction of "
                        "it (default on the CPU: threads x clock x 32 FLOP/cycle; none on CUDA)")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
