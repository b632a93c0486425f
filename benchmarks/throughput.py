"""Where the tracker's host time goes: aten ops dispatched per unit of work, and frames/s
(a benchmark, not a test).

    python -m benchmarks.throughput [--backbone resnet18] [--size 240x432] [--num-aug 5]
        [--objects 1,3] [--frames 10] [--sequences 4] [--batch 4] [--repeats 3] [--dev cpu] [--threads 2]

On a GPU each dispatched op is at least one kernel launch, and at a few tens of µs per launch
the launches, not the arithmetic, set the time. Ops are counted with a TorchDispatchMode,
views and allocations excluded, through the public API (`build_tracker`, `track`) on synthetic
sequences, random weights (the counts do not depend on them):
* object start: the ops of the frame where the objects start, per object;
* computed / reused frame: median ops of a tracked frame with the gate forced to compute / reuse,
  frames where the target models re-optimize excluded;
* memory insert: per insert into the target models' memories (one per frame, all its computed
  objects together);
* optimizer frame: the ops of one filter re-optimization (every 8th application; the objects
  due together run as one);
* sequence-frame: the ops of tracking the --sequences sequences over their frames after the
  first (where the objects start), per sequence-frame, and over all frames (starts included),
  at B = 1 (one sequence at a time) and at B = --batch (in lockstep).
Then wall frames/s (frames over the time tracking takes, reading included) and tracker frames/s
(frames over the tracker's own per-frame seconds) for --sequences sequences tracked one after
another (B = 1, `track`) and --batch at a time in lockstep (`track_many`), the two alternating
within each of --repeats runs; medians, and their ratio. No reference numbers are stored anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import tracker_speed
from benchmarks.tracker_speed import make_frames
from lib.cli import (add_device_flag, add_num_aug_flag, add_random_backbone_flag, add_threads_flag, cpu_threads,
                     image_size, int_at_least, resolve_device, run)
from models.target_model import TargetModelTable

# Factory functions and other ops that only allocate or alias: not counted, as views are not.
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full",
               "full_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full", "lift_fresh",
               "detach", "alias", "_unsafe_view"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched (views and allocations excluded), in total and per named section."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.sections: Counter = Counter()
        self.calls: Counter = Counter()
        self._open: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func._schema.name.split("::")[-1] not in ALLOCATIONS:
            self.total += 1
            for name in set(self._open):
                self.sections[name] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def section(self, name: str):
        self._open.append(name)
        self.calls[name] += 1
        try:
            yield
        finally:
            self._open.pop()


@contextmanager
def sections(counter: OpCounter):
    """Attribute the ops of memory inserts and target-model optimizer runs to their own sections."""
    insert, optimize = TargetModelTable.insert, TargetModelTable.optimize

    def counted_insert(self, *args, **kwargs):
        with counter.section("insert"):
            return insert(self, *args, **kwargs)

    def counted_run(self, *args, **kwargs):
        with counter.section("optimizer"):
            return optimize(self, *args, **kwargs)

    with mock.patch.object(TargetModelTable, "insert", counted_insert), \
            mock.patch.object(TargetModelTable, "optimize", counted_run):
        yield


def random_tracker(backbone: str, device: torch.device, num_aug: int, reuse: bool | None):
    """benchmarks.tracker_speed's seeded random tracker with `num_aug` first-frame images, its
    target models updated after every computed frame: random weights seldom give the confident
    pixels an update needs, and a trained model's updates are part of what is counted."""
    tracker = tracker_speed.random_tracker(backbone, device, reuse, num_aug=num_aug)
    tracker.target_config = dataclasses.replace(tracker.target_config, min_update_pixels=0)
    return tracker


def count_ops(tracker, frames: list[tuple], num_objects: int) -> dict:
    """Ops of one tracked sequence: per object start, per tracked frame (median, optimizer frames
    excluded), per memory insert, per optimizer run, and per sequence-frame."""
    per_frame, optimizer_frames = [], 0
    total = 0
    stream = tracker.track(frames, threshold=0.5, keep_probabilities=False)
    inserts = optimizer = insert_calls = optimizer_calls = 0
    for t in range(len(frames)):
        counter = OpCounter()
        with counter, sections(counter):
            next(stream)
        total += counter.total
        if t == 0:
            start = counter.total / num_objects
            continue
        if counter.calls["optimizer"]:
            optimizer += counter.sections["optimizer"]
            optimizer_calls += counter.calls["optimizer"]
            optimizer_frames += 1
        else:
            per_frame.append(counter.total)
        inserts += counter.sections["insert"]
        insert_calls += counter.calls["insert"]
    return {"start": start, "frame": float(np.median(per_frame)) if per_frame else float("nan"),
            "insert": inserts / max(1, insert_calls), "optimizer": optimizer / max(1, optimizer_calls),
            "sequence_frame": total / len(frames)}


def run_sequences(tracker, sequences: list[list[tuple]], batch: int) -> float:
    """Track all sequences, one at a time (`track`, batch 1) or `batch` in lockstep (`track_many`)
    -> the tracker's own seconds."""
    if batch == 1:
        return sum(r.seconds for frames in sequences
                   for r in tracker.track(frames, threshold=0.5, keep_probabilities=False))
    return sum(r.seconds for _, r in tracker.track_many(enumerate(sequences), threshold=0.5, batch=batch,
                                                         keep_probabilities=False))


def sequence_frame_ops(tracker, sequences: list[list[tuple]], batch: int) -> tuple[float, float]:
    """Ops of tracking the sequences at this batch, per sequence-frame: (frames after each
    sequence's first, all frames). Ops are attributed to the result a step's work yields first;
    the sequences must be of one length (all start in the same step)."""
    if batch == 1:
        stream = ((i, r) for i, frames in enumerate(sequences)
                  for r in tracker.track(frames, threshold=0.5, keep_probabilities=False))
    else:
        stream = tracker.track_many(enumerate(sequences), threshold=0.5, batch=batch, keep_probabilities=False)
    seen: Counter = Counter()
    tracked = total = 0
    while True:
        counter = OpCounter()
        with counter:
            item = next(stream, None)
        total += counter.total
        if item is None:
            break
        if seen[item[0]]:
            tracked += counter.total
        seen[item[0]] += 1
    frames = sum(len(s) for s in sequences)
    return tracked / (frames - len(sequences)), total / frames


def frames_per_second(tracker, sequences: list[list[tuple]], repeats: int,
                      batches: tuple[int, ...] = (1,)) -> dict[int, tuple[float, float]]:
    """{batch: (wall frames/s, tracker frames/s)}, medians over `repeats` runs over all
    sequences, the batches alternating within each repeat (so load changes hit them alike)."""
    wall: dict[int, list] = {b: [] for b in batches}
    own: dict[int, list] = {b: [] for b in batches}
    n = sum(len(s) for s in sequences)
    for _ in range(repeats):
        for b in batches:
            start = time.perf_counter()
            seconds = run_sequences(tracker, sequences, b)
            if tracker.device.type == "cuda":
                torch.cuda.synchronize(tracker.device)
            wall[b].append(n / (time.perf_counter() - start))
            own[b].append(n / seconds)
    return {b: (float(np.median(wall[b])), float(np.median(own[b]))) for b in batches}


def main(args: argparse.Namespace) -> dict:
    """Count and time as the module's docstring says; returns the printed numbers."""
    with cpu_threads(args.threads):
        return _count_and_time(args, *resolve_device(args.dev))


def _count_and_time(args: argparse.Namespace, device: torch.device, _: str) -> dict:
    h, w = args.size
    print(f"{args.backbone}, {h}x{w}, --num-aug {args.num_aug}, {args.frames} frames, random weights, device {device}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    trackers = {reuse: random_tracker(args.backbone, device, args.num_aug, reuse) for reuse in (False, True)}
    out = {}
    batches = (1,) if args.batch == 1 else (1, args.batch)
    print(f"{'objects':>8}{'B':>4}{'start/obj':>11}{'computed':>10}{'reused':>8}{'insert':>8}{'optimizer':>10}"
          f"{'seq-frame':>10}{'with starts':>13}{'wall FPS':>10}{'tracker FPS':>13}")
    for num_objects in args.objects:
        frames = make_frames(num_objects, args.frames, (h, w))
        computed = count_ops(trackers[False], frames, num_objects)
        reused = count_ops(trackers[True], frames, num_objects)
        sequences = [make_frames(num_objects, args.frames, (h, w), seed=1 + i) for i in range(args.sequences)]
        frames_per_second(trackers[False], sequences[:1], 1, batches)  # warm-up
        fps = frames_per_second(trackers[False], sequences, args.repeats, batches)
        out[num_objects] = {**computed, "reused": reused["frame"], "wall_fps": fps[1][0], "tracker_fps": fps[1][1],
                            "batches": {}}
        for b in batches:
            seq_frame, with_starts = sequence_frame_ops(trackers[False], sequences, b)
            out[num_objects]["batches"][b] = {"sequence_frame": seq_frame, "with_starts": with_starts,
                                              "wall_fps": fps[b][0], "tracker_fps": fps[b][1]}
            print(f"{num_objects:>8}{b:>4}{computed['start']:>11.0f}{computed['frame']:>10.0f}{reused['frame']:>8.0f}"
                  f"{computed['insert']:>8.0f}{computed['optimizer']:>10.0f}{seq_frame:>10.0f}{with_starts:>13.0f}"
                  f"{fps[b][0]:>10.2f}{fps[b][1]:>13.2f}", flush=True)
        if len(batches) > 1:
            b, rows = batches[-1], out[num_objects]["batches"]
            print(f"{'':>8}B={b} / B=1: seq-frame ops {rows[b]['sequence_frame'] / rows[1]['sequence_frame']:.2f}x, "
                  f"wall FPS {fps[b][0] / fps[1][0]:.2f}x, tracker FPS {fps[b][1] / fps[1][1]:.2f}x", flush=True)
    print("ops: aten ops dispatched, views and allocations excluded; start/obj: the start frame's ops per object; "
          "computed, reused: per frame (gate forced), optimizer frames excluded (B = 1); insert: per memory insert "
          "(a frame's objects together); optimizer: per re-optimization (the objects due together); seq-frame: the sequences' ops per frame after their first "
          "(computed; B > 1: in lockstep), with starts: over all their frames; FPS: gate forced to compute, medians of --repeats "
          "runs, B = 1 and B alternating")
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_random_backbone_flag(p)
    p.add_argument("--size", type=image_size(32), default=(240, 432), help="frame size HxW (default 240x432)")
    add_num_aug_flag(p, default=5)
    p.add_argument("--objects", type=lambda s: [int_at_least(1)(n) for n in s.split(",")], default=[1, 3],
                   help="comma-separated object counts, all starting on the first frame (default 1,3)")
    p.add_argument("--frames", type=int_at_least(2), default=10,
                   help="frames per sequence; with 9 or more a target-model re-optimization is counted (default 10)")
    p.add_argument("--sequences", type=int_at_least(1), default=4, help="sequences per timing run (default 4)")
    p.add_argument("--batch", type=int_at_least(1), default=4,
                   help="also track the --sequences sequences this many at a time in lockstep (Tracker.track_many) "
                        "and print that row beside B = 1 (default 4; 1: B = 1 only)")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timing runs; FPS are medians (default 3)")
    add_device_flag(p)
    add_threads_flag(p, default=2)
    return p


if __name__ == "__main__":
    run(main, get_parser())
