"""The tracker under PyTorch eager and under onnxruntime (export.py, deploy/), side by side in one
run (a benchmark, not a test).

    python -m benchmarks.runtimes [--size 480x854] [--frames 6] [--repeats 3] [--threads 2]
        [--num-aug 5] [--int8] [--keep DIR]

One ResNet-18 G-FRTM with seeded random weights (speed does not depend on them) tracks one object
on synthetic frames, exported once to ONNX (fp32; with --int8 also quantised as export.py --int8
does, calibrated on the benchmark's own frames). Each runtime tracks the frames twice per repeat:
* computed: TH 0.999999, the gate runs and every object computes (p_reuse < 1);
* reused: TH 0, the gate runs and every object reuses its decoder state (p_reuse > 0).
The runs alternate (torch, onnxruntime fp32, [int8], then again for each repeat), so the drift of
a shared machine hits every runtime alike; each time is the median ms per frame over the frames
after the first of all repeats. The first frame of each run is the object's start (the
first-frame fit over --num-aug augmented images, the first filter optimisation, the decoder's
first state): its median over all runs is the start time. Printed: ms per runtime and the speed-up
of each onnxruntime variant over torch eager, for a start, a computed and a reused frame. No
reference timing is stored.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

import export
from benchmarks.tracker_speed import make_frames
from deploy.runtime import ExportedTracker
from lib.cli import add_num_aug_flag, add_threads_flag, cpu_threads, image_size, int_at_least, run
from models import build_tracker
from models.network import GFRTM

COMPUTED_TH = 0.999999  # the gate runs, every object computes (p_reuse < 1)
REUSED_TH = 0.0  # every object reuses (p_reuse > 0)


def _checkpoint(folder: Path) -> Path:
    """A G-FRTM ResNet-18 checkpoint with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = GFRTM("resnet18").eval()
    path = folder / "random_rn18.pth"
    torch.save({"model": net.state_dict(), "backbone": "resnet18"}, path)
    return path


def _export(checkpoint: Path, out: Path, threads: int, num_aug: int) -> Path:
    """export.py on the checkpoint (random backbone; `num_aug` images in an object's start)."""
    export.main(export.get_parser().parse_args(["--model", str(checkpoint), "--out", str(out), "--backbone-weights",
                                                "random", "--num-aug", str(num_aug), "--threads", str(threads)]))
    return out


def _quantised(fp32: Path, out: Path, frames: list[tuple]) -> Path:
    """A copy of the fp32 export quantised as `export.py --int8` does, calibrated on `frames`."""
    calibration = out.parent / "calibration"
    calibration.mkdir(exist_ok=True)
    for t, (image, _, _) in enumerate(frames):
        cv2.imwrite(str(calibration / f"{t:05d}.png"), image.permute(1, 2, 0).numpy()[..., ::-1])
    shutil.copytree(fp32, out)
    export.quantize_graphs(out, [calibration], len(frames))
    return out


def _times(results) -> tuple[float, list[float], list[bool]]:
    """A run's results -> the start's seconds, each tracked frame's seconds, the gate decisions."""
    results = list(results)
    return results[0].seconds, [r.seconds for r in results[1:]], [v for r in results[1:] for v in r.reused.values()]


def main(args: argparse.Namespace) -> dict:
    thresholds = {"computed": COMPUTED_TH, "reused": REUSED_TH}
    frames = make_frames(1, args.frames, args.size)
    numpy_frames = [(image.permute(1, 2, 0).numpy(), None if labels is None else labels.numpy(), ids)
                    for image, labels, ids in frames]
    with tempfile.TemporaryDirectory() as tmp, cpu_threads(args.threads):
        folder = Path(args.keep) if args.keep else Path(tmp)
        checkpoint = _checkpoint(folder)
        runtimes = {"torch eager": build_tracker(str(checkpoint), num_aug=args.num_aug, backbone_weights="random")}
        fp32 = _export(checkpoint, folder / "fp32", args.threads, args.num_aug)
        runtimes["onnxruntime fp32"] = ExportedTracker(fp32, threads=args.threads)
        if args.int8:
            runtimes["onnxruntime int8"] = ExportedTracker(_quantised(fp32, folder / "int8", frames),
                                                           threads=args.threads)
        seconds = {(name, kind): [] for name in runtimes for kind in ("start", *thresholds)}
        for _ in range(args.repeats):
            for kind, threshold in thresholds.items():
                for name, tracker in runtimes.items():
                    if name == "torch eager":
                        start, times, decisions = _times(tracker.track(frames, threshold, keep_probabilities=False))
                    else:
                        start, times, decisions = _times(tracker.track(numpy_frames, threshold))
                    if any(d != (kind == "reused") for d in decisions):
                        raise RuntimeError(f"{name}, {kind}: a gate decision went the other way")
                    seconds[name, kind] += times
                    seconds[name, "start"].append(start)
    ms = {key: 1000 * statistics.median(values) for key, values in seconds.items()}
    h, w = args.size
    print(f"ResNet-18, 1 object, {h}x{w}, {args.threads} threads, {args.frames - 1} frames x {args.repeats} repeats, "
          f"starts over {args.num_aug} images: {2 * args.repeats} (median ms; speed-up over torch eager)")
    print(f"{'runtime':<18}{'start ms':>12}{'x':>7}{'computed ms':>12}{'x':>7}{'reused ms':>12}{'x':>7}")
    for name in runtimes:
        row = f"{name:<18}"
        for kind in ("start", *thresholds):
            row += f"{ms[name, kind]:>12.1f}{ms['torch eager', kind] / ms[name, kind]:>7.2f}"
        print(row)
    return {f"{name} {kind}": value for (name, kind), value in ms.items()}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tracker speed, torch eager against onnxruntime (fp32, int8), "
                                                 "alternating in one run.")
    parser.add_argument("--size", type=image_size(64), default=(480, 854), help="frame size HxW (default 480x854)")
    parser.add_argument("--frames", type=int_at_least(2), default=6,
                        help="frames per run; the first (the object's start) is not timed (default 6)")
    parser.add_argument("--repeats", type=int_at_least(1), default=3, help="alternating runs per runtime (default 3)")
    add_num_aug_flag(parser, default=5)
    parser.add_argument("--int8", action="store_true", help="also an int8 export (export.py --int8)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="folder to keep the checkpoint and exports in (default: a temporary folder)")
    add_threads_flag(parser, 2)
    return parser


if __name__ == "__main__":
    run(main, get_parser())
