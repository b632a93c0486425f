"""G-FRTM demo.

Own video (implemented here):

    python demo.py --video clip.mp4 --mask first_frame.png --model weights/gfrtm_rn18.pth

segments a video (an MP4, or a folder of JPG/PNG frames sorted by name) from the mask of its
first frame (a label PNG whose pixel values are object ids, e.g. a DAVIS palette PNG), or from a
folder of label PNGs named like the frames, where each object starts at the first PNG holding its
id. Frames whose shorter side exceeds --max-size (default 480, like DAVIS 480p) are tracked at
that shorter side (images resized with cv2.INTER_AREA, masks with nearest neighbour); the masks
found are resized back (nearest) to the frame size before they are written. Output, in --out
(default ./demo_out/<video name>): masks/<frame>.png (palette PNGs at the original frame size),
overlay.mp4, overlay.gif, timeline.json and timeline.png (which objects reused or computed, per
frame).

Without --video: the default main job (main_job.py: synthetic data -> training -> evaluation -> overlay).
Each job has its own parser (`video_parser`, `main_job_parser`); `get_parser` picks one by --video.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


import numpy as np

import main_job
from evaluation.job import changed_fields, exported_settings
from evaluation.results import TrackingStats, percent, write_timeline
from evaluation.tracking import track_sequence
from evaluation.visuals import GifWriter, Mp4Writer, overlay, save_timeline_png
from lib.background import BackgroundWriter, read_ahead
from lib.cli import (UsageError, add_backbone_weights_flag, add_batch_sequences_flag, add_compile_flag, add_device_flag,
                     add_mask_flag, add_max_size_flag, add_num_aug_flag, add_precision_flag, add_seed_flag,
                     add_threads_flag, add_threshold_flag, add_video_flag, int_at_least, positive_float,
                     resolve_device, run)
from lib.fileio import make_dirs
from lib.manifest import read_manifest
from lib.image_io import resize_labels_nearest_exact, write_label_png
from lib.video_io import MaskSet, TrackerFeed, open_frames, processing_size


DEFAULT_FPS_OUT = 10.0  # overlay frame rate where the input has none (a frame folder)

# ---------------------------------------------------------------------------------------------
# Parsers


def video_parser() -> argparse.ArgumentParser:
    """The own-video job's flags (`python demo.py --video ...`)."""
    parser = argparse.ArgumentParser(
        description="G-FRTM (Reuse-VOS) demo: segment your own video from the mask of its first frame.")
    add_video_flag(parser)
    add_mask_flag(parser)
    parser.add_argument("--model", type=Path, required=True,
                        help="G-FRTM / FRTM checkpoint (released or ours) to segment with, or a folder written by "
                             "export.py, run by onnxruntime (its --num-aug, --seed and --backbone-weights are those "
                             "it was exported with)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default ./demo_out/<video name>): masks/<frame>.png, "
                             "overlay.mp4, overlay.gif, timeline.json, timeline.png")
    add_threshold_flag(parser)
    add_device_flag(parser)
    add_precision_flag(parser)
    add_compile_flag(parser)
    add_num_aug_flag(parser, default=5)
    add_backbone_weights_flag(parser)
    add_seed_flag(parser)
    add_max_size_flag(parser)
    parser.add_argument("--fps-out", type=positive_float, default=None,
                        help="frame rate of overlay.mp4 and overlay.gif (default: the input video's frame rate; "
                             f"{DEFAULT_FPS_OUT:g} for a frame folder or a video that does not give one)")
    return parser


def main_job_parser() -> argparse.ArgumentParser:
    """The default main job's flags (`python demo.py`, `bash scripts/demo.sh`)."""
    parser = argparse.ArgumentParser(
        description="G-FRTM (Reuse-VOS) demo: the default main job (synthetic data -> training -> evaluation "
                    "-> overlays and the gate report; docs/main-job.md). For your own video: "
                    "python demo.py --video VIDEO --mask MASK --model CKPT (python demo.py --video V --help).")
    parser.add_argument("--work", type=Path, default=Path("./demo_out/main"),
                        help="folder for the synthetic data, checkpoints, results and overlays (default ./demo_out/main)")
    parser.add_argument("--epochs", type=int_at_least(1), default=45,
                        help="training epochs of 12 samples (default 45: a few minutes on 2 CPU cores; the reuse "
                             "gate starts reusing on still stretches)")
    add_threshold_flag(parser, several=True)
    add_device_flag(parser)
    add_precision_flag(parser)  # training and evaluation
    add_compile_flag(parser)  # evaluation
    add_num_aug_flag(parser, default=5)  # evaluation
    add_seed_flag(parser)
    add_batch_sequences_flag(parser)
    add_threads_flag(parser, default=main_job.JOB_THREADS,
                     why=" for the job's training and evaluation; docs/main-job.md's run used 2: the job's "
                         "floating-point results, and with them whether the gate meets its goals, change with the "
                         "thread count")
    return parser


def get_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser of the job the command line (`argv`, default sys.argv[1:]) asks for: the own
    video with --video, else the main job."""
    argv = sys.argv[1:] if argv is None else argv
    return video_parser() if any(a == "--video" or a.startswith("--video=") for a in argv) else main_job_parser()


# ---------------------------------------------------------------------------------------------
# Own video


def overlay_fps(fps_out: Optional[float], video_fps: Optional[float]) -> float:
    """Frame rate of the overlays: --fps-out if given, else the input video's, else DEFAULT_FPS_OUT."""
    if fps_out is not None:
        return float(fps_out)
    return float(video_fps) if video_fps else DEFAULT_FPS_OUT


def run_own_video(args: argparse.Namespace) -> dict:
    """Segment args.video from args.mask with args.model (a checkpoint, or a folder written by
    export.py); write the outputs; return a summary."""
    model = Path(args.model).expanduser()
    exported = None
    if model.is_dir():  # an export: onnxruntime, with the settings it was exported with
        exported = read_manifest(model, "--model")
        parser = video_parser()
        given = changed_fields(args, {name: parser.get_default(name) for name in vars(args)})
        settings = exported_settings(model, exported, given)
    elif not model.is_file():
        raise FileNotFoundError(f"--model: checkpoint not found: {args.model}")
    else:
        settings = {"precision": args.precision, "runtime": "torch"}
    bw = args.backbone_weights
    if exported is None and bw.lower() not in ("imagenet", "random", "none") and not Path(bw).expanduser().is_file():
        raise FileNotFoundError(f"--backbone-weights: no such file: {bw} (or use 'imagenet' / 'random')")
    device, _ = resolve_device("cpu" if exported is not None else args.dev)

    frames = open_frames(args.video, flag="--video")
    masks = MaskSet(args.mask, flag="--mask")
    starts = masks.match(frames)
    height, width = frames.size
    size = processing_size(height, width, args.max_size)
    out = Path(args.out) if args.out is not None else Path("demo_out") / frames.name
    mask_dir = out / "masks"

    # After the cheap checks, before anything is written (a bad model creates no folder)
    if exported is not None:
        from evaluate import open_exported  # onnxruntime's CPU provider
        tracker = open_exported(model)
    else:
        from models import build_tracker
        tracker = build_tracker(str(model), device=device, num_aug=args.num_aug, backbone_weights=bw, seed=args.seed,
                                precision=args.precision, compile=args.compile)
    make_dirs(mask_dir, "the output folder", "--out")

    resized = size != (height, width)
    runs_on = f"onnxruntime {settings['precision']} (exported)" if exported is not None else f"device {device}"
    print(f"{frames.name}: {width}x{height} frames"
          f"{f', tracked at {size[1]}x{size[0]}' if resized else ''}; objects {masks.object_ids}; "
          f"{runs_on}; threshold {args.TH}", flush=True)
    feed = TrackerFeed(frames, starts, size)
    fps_out = overlay_fps(args.fps_out, frames.fps)
    stats = TrackingStats()
    start = time.perf_counter()
    # Frames decoded ahead in one thread; masks and overlays resized, encoded and written behind
    # in another (in order), all flushed before the videos are closed.
    with Mp4Writer(out / "overlay.mp4", fps_out) as mp4, \
            GifWriter(out / "overlay.gif", fps_out) as gif, BackgroundWriter() as background:
        def write(stem: str, rgb, labels) -> None:
            labels = resize_labels_nearest_exact(labels, (height, width))
            write_label_png(mask_dir / f"{stem}.png", labels)
            shown = overlay(rgb, labels)
            mp4.write(shown)
            gif.add(shown)

        for result in track_sequence(tracker, read_ahead(feed), args.TH, stats, feed.current_stem):
            stem, rgb = feed.pop()
            labels = np.asarray(result.labels)
            background.submit(mask_dir / f"{stem}.png", lambda s=stem, r=rgb, x=labels: write(s, r, x))
            if stats.frames % 50 == 0:
                print(f"  {stats.frames} frames", flush=True)
        background.flush()
    stats.wall_seconds = time.perf_counter() - start
    feed.check_all_used()

    fps = stats.fps
    write_timeline(out / "timeline.json", fps, stats.timeline)
    save_timeline_png(out / "timeline.png", {"fps": fps, "frames": stats.timeline}, frames.name)
    reused, tracked = stats.reused, stats.tracked
    summary = {"video": str(args.video), "out": str(out), "frames": stats.frames, "fps": fps,
               "reused": reused, "tracked": tracked, "reuse_rate": stats.reuse_rate,
               "size": (height, width), "tracking_size": size, "fps_out": fps_out, **settings,
               "wall_seconds": stats.wall_seconds, "wall_fps": stats.wall_fps}
    rate = percent(stats.reuse_rate)
    print(f"{stats.frames} frames, tracker {fps:.1f} FPS, wall {stats.wall_fps:.1f} FPS (reading, tracking and "
          f"writing), reuse {rate} ({reused}/{tracked} object-frames)")
    print(f"wrote {mask_dir}/*.png, {out / 'overlay.mp4'}, {out / 'overlay.gif'}, "
          f"{out / 'timeline.json'}, {out / 'timeline.png'}")
    return summary


def main(args: argparse.Namespace) -> dict:
    """The own video (args of `video_parser`) or the main job (args of `main_job_parser`)."""
    if getattr(args, "video", None) is not None:
        return run_own_video(args)
    return main_job.run_main_job(args)


if __name__ == "__main__":
    run(main, get_parser())
