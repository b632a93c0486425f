"""How closely reduced precision follows fp32 on real frames (a benchmark, not a test).

    python -m benchmarks.precision_fidelity --model CKPT --davis-root ../shared/data/davis-sample
        [--precision fp32,bf16] [--TH 0.7] [--backbone-weights imagenet] [--seed 0] [--num-aug 5]
        [--sequences blackswan,dog] [--max-frames N] [--dev cpu] [--threads 2]

Tracks every DAVIS 2017 val sequence of --davis-root with each precision (the first is the
reference, normally fp32) and prints, for each other precision:
* gate agreement: the share of object-frames where its reuse decision equals the reference's;
* mean J against the reference: the reference's labels taken as ground truth (DAVIS J, per
  object over the frames between the first and the last, averaged over objects and sequences);
* J&F against the ground truth of each precision, and their difference in points;
* the tracker-time speed-up over the reference (the sequences alternate between precisions).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from dataset.davis import DAVISDataset
from lib.cli import (UsageError, add_backbone_weights_flag, add_data_root_flags, add_device_flag, add_num_aug_flag,
                     add_precision_flag, add_seed_flag, add_threads_flag, add_threshold_flag, cpu_threads, int_at_least,
                     resolve_device, run)
from lib.metrics import evaluate_results, evaluate_sequence
from models import build_tracker


def track(tracker, sequence, th: float, max_frames: int | None) -> tuple[np.ndarray, list[dict], float]:
    """(labels T x H x W, per-frame {object id: reused}, tracker seconds) of one sequence."""
    frames = (sequence[i] for i in range(min(len(sequence), max_frames or len(sequence))))
    labels, gates, seconds = [], [], 0.0
    for result in tracker.track(frames, th, keep_probabilities=False):
        labels.append(result.labels.numpy())
        gates.append(dict(result.reused))
        seconds += result.seconds
    return np.stack(labels), gates, seconds


def main(args: argparse.Namespace) -> dict:
    with cpu_threads(args.threads):
        return _measure(args)


def _measure(args: argparse.Namespace) -> dict:
    if len(args.precision) < 2:
        raise UsageError("--precision needs a reference and at least one precision to compare, e.g. fp32,bf16")
    data = DAVISDataset(args.davis_root, "2017", "val", args.sequences)
    device, device_text = resolve_device(args.dev)
    trackers = {p: build_tracker(args.model, device=device, num_aug=args.num_aug, precision=p,
                                 backbone_weights=args.backbone_weights, seed=args.seed) for p in args.precision}
    reference = args.precision[0]
    print(f"{args.model} on {len(data.sequence_names)} sequences of {data.root}, TH {args.TH:g}, device {device_text}, "
          f"{torch.get_num_threads()} threads, reference {reference}")
    gt, runs = {}, {p: {} for p in args.precision}
    for name in data.sequence_names:
        sequence = data.sequence(name)
        for p, tracker in trackers.items():
            runs[p][name] = track(tracker, sequence, args.TH, args.max_frames)
        frames = len(runs[reference][name][0])
        gt[name] = (sequence.ground_truth()[:frames], sequence.obj_ids, sequence.first_frame_indices)
        print(f"  {name}: {frames} frames", flush=True)

    def jf(p: str) -> float:
        return evaluate_results([(n, gt[n][0], runs[p][n][0], gt[n][1], gt[n][2]) for n in gt])["J&F"]

    ref_gates = [v for r in runs[reference].values() for g in r[1] for v in g.values()]
    out = {"reference": reference, "J&F": {reference: jf(reference)},
           "reuse_rate": sum(ref_gates) / max(1, len(ref_gates))}
    ref_seconds = sum(r[2] for r in runs[reference].values())
    print(f"{'precision':<10}{'gates agree':>13}{'J vs ' + reference:>12}{'J&F':>8}{'J&F diff':>10}{'speed-up':>10}")
    print(f"{reference:<10}{'-':>13}{'-':>12}{100 * out['J&F'][reference]:>8.1f}{'-':>10}{'1.00x':>10}")
    for p in args.precision[1:]:
        same = total = 0
        j_values = []
        for name, (ref_labels, ref_gates, _) in runs[reference].items():
            labels, gates, _ = runs[p][name]
            for a, b in zip(ref_gates, gates):
                same += sum(a[k] == b.get(k) for k in a)
                total += len(a)
            j_values.append(evaluate_sequence(ref_labels, labels, gt[name][1], gt[name][2])["J"]["mean"])
        out["J&F"][p] = jf(p)
        out[p] = {"gate_agreement": same / max(1, total), "J_vs_reference": float(np.nanmean(j_values)),
                  "J&F_diff_points": 100 * (out["J&F"][p] - out["J&F"][reference]),
                  "speedup": ref_seconds / sum(r[2] for r in runs[p].values())}
        r = out[p]
        print(f"{p:<10}{100 * r['gate_agreement']:>12.1f}%{r['J_vs_reference']:>12.3f}{100 * out['J&F'][p]:>8.1f}"
              f"{r['J&F_diff_points']:>+10.2f}{r['speedup']:>9.2f}x")
    print(f"gates agree: object-frames with the {reference} decision ({total} in all); J vs {reference}: DAVIS J of "
          f"the labels against {reference}'s; J&F diff: points against {reference}'s J&F on the ground truth; "
          f"{reference} reuse rate {100 * out['reuse_rate']:.1f}%")
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="G-FRTM checkpoint to track with")
    add_data_root_flags(p)  # --davis-root: a DAVIS-layout folder with ImageSets/2017/val.txt
    p.add_argument("--sequences", type=lambda s: s.split(","), default=None,
                   help="comma-separated sequence names (default: all of 2017 val)")
    p.add_argument("--max-frames", type=int_at_least(2), default=None, help="track at most this many frames per sequence")
    add_threshold_flag(p)
    add_num_aug_flag(p, default=5)
    add_backbone_weights_flag(p)
    add_seed_flag(p)
    add_device_flag(p)
    add_threads_flag(p, default=2)
    add_precision_flag(p, several=True, default="fp32,bf16")
    return p


if __name__ == "__main__":
    run(main, get_parser())
