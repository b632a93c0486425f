"""Segment one's own video with an exported tracker, without PyTorch.

    python -m deploy --model EXPORTED_DIR --video FRAMES_OR_MP4 --mask FIRST.png --out OUT

Writes OUT/masks/<frame>.png (label PNGs at the frames' size, as `demo.py --video` does) and
OUT/timeline.json (per frame, which objects reused or computed). A user mistake (missing file,
bad folder, bad flag) is one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from evaluation.results import TrackingStats
from lib.errors import UsageError
from lib.fileio import atomic_write_bytes, make_dirs
from lib.flags import add_mask_flag, add_max_size_flag, add_threads_flag, add_threshold_flag, add_video_flag
from lib.image_io import resize_labels_nearest_exact, write_label_png
from lib.metrics import json_safe
from lib.video_io import MaskSet, TrackerFeed, open_frames, processing_size

from .runtime import ExportedTracker


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy",
        description="Segment a video from its first frame's mask with a tracker exported by export.py, run by "
                    "onnxruntime (no PyTorch). docs/deployment.md.")
    parser.add_argument("--model", type=Path, required=True, help="folder written by export.py (manifest.json, *.onnx)")
    add_video_flag(parser)
    add_mask_flag(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder: masks/<frame>.png, timeline.json")
    add_threshold_flag(parser)
    add_max_size_flag(parser)
    add_threads_flag(parser, None, runtime="onnxruntime")
    return parser


def main(args: argparse.Namespace) -> dict:
    frames = open_frames(args.video, flag="--video")
    masks = MaskSet(args.mask, flag="--mask")
    starts = masks.match(frames)
    tracker = ExportedTracker(args.model, threads=args.threads)
    height, width = frames.size
    size = processing_size(height, width, args.max_size)
    mask_dir = args.out / "masks"
    make_dirs(mask_dir, "the masks folder", fix="--out")
    feed = TrackerFeed(frames, starts, size)
    stats = TrackingStats()
    start = time.perf_counter()
    for result in tracker.track(feed, args.TH):
        stem, _ = feed.pop()
        write_label_png(mask_dir / f"{stem}.png", resize_labels_nearest_exact(result.labels, (height, width)))
        stats.add(result, stem)
    stats.wall_seconds = time.perf_counter() - start
    feed.check_all_used()
    fps = stats.fps
    timeline = json_safe({"fps": fps, "frames": stats.timeline})
    atomic_write_bytes(args.out / "timeline.json", (json.dumps(timeline, indent=1) + "\n").encode())
    print(f"{stats.frames} frames, tracker {fps:.1f} FPS, reuse {stats.reused}/{stats.tracked} object-frames; "
          f"wrote {mask_dir}/*.png and {args.out / 'timeline.json'}")
    return stats.as_dict()


def run(argv: list[str] | None = None) -> None:
    """Parse and run; a user mistake becomes one `error:` line and exit status 2 (as `lib.cli.run`,
    which imports PyTorch)."""
    parser = get_parser()
    try:
        main(parser.parse_args(argv))
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
