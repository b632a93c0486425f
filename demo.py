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
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional


from lib.background import BackgroundWriter, read_ahead
import main_job
from lib.cli import (UsageError, add_backbone_weights_flag, add_batch_sequences_flag, add_compile_flag, add_device_flag,
                     add_num_aug_flag, add_precision_flag, add_seed_flag, add_threads_flag, add_threshold_flag,
                     int_at_least, positive_float, resolve_device, run)
from lib.fileio import make_dirs
from lib.image_io import resize_labels_nearest_exact, write_label_png
from lib.video_io import MaskSet, TrackerFeed, open_frames, processing_size
from lib.results import TrackingStats
from lib.visualize import GifWriter, Mp4Writer, overlay, save_timeline_png, write_timeline


DEFAULT_FPS_OUT = 10.0  # overlay frame rate where the input has none (a frame folder)

# ---------------------------------------------------------------------------------------------
# Argument types


def _max_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer (pixels, 0 = never resize), got {text!r}")
    if value != 0 and value < 32:
        raise argparse.ArgumentTypeError(f"must be 0 (never resize) or at least 32 pixels, got {value}")
    return value


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="G-FRTM (Reuse-VOS) demo. With --video: segment your own video from the mask of "
                    "its first frame (see --video, --mask).")
    own = parser.add_argument_group("own video")
    own.add_argument("--video", type=Path, default=None,
                     help="video to segment: an MP4 (any file OpenCV decodes; frames are named 00000, "
                          "00001, ...) or a folder of JPG/PNG frames sorted by name (frames named by "
                          "their file stems)")
    own.add_argument("--mask", type=Path, default=None,
                     help="label PNG of the first frame (pixel value = object id, e.g. a DAVIS palette "
                          "PNG; 0 = background), or a folder of label PNGs named like the frames (for an "
                          "MP4: by frame number, 00012.png): an object starts at the first PNG holding "
                          "its id. Masks need the frame's aspect ratio, any size (resized nearest)")
    own.add_argument("--model", type=Path, default=None,
                     help="G-FRTM / FRTM checkpoint (released or ours) to segment with (required with --video)")
    own.add_argument("--out", type=Path, default=None,
                     help="output folder (default ./demo_out/<video name>): masks/<frame>.png, "
                          "overlay.mp4, overlay.gif, timeline.json, timeline.png")
    add_threshold_flag(own, several=True)
    add_device_flag(own)
    add_precision_flag(own)  # also the main job's training and evaluation
    add_compile_flag(own)  # also the main job's evaluation
    add_num_aug_flag(own, default=5)  # also the main job's evaluation
    add_backbone_weights_flag(own)
    add_seed_flag(own)
    own.add_argument("--max-size", type=_max_size, default=480,
                     help="frames whose shorter side exceeds this many pixels are tracked at that shorter "
                          "side (INTER_AREA), the masks resized back (nearest) to the frame size (default "
                          "480, like DAVIS 480p; 0 = never resize)")
    own.add_argument("--fps-out", type=positive_float, default=None,
                     help="frame rate of overlay.mp4 and overlay.gif (default: the input video's frame rate; "
                          f"{DEFAULT_FPS_OUT:g} for a frame folder or a video that does not give one)")
    job = parser.add_argument_group("default main job (no --video)")
    job.add_argument("--work", type=Path, default=Path("./demo_out/main"),
                     help="folder for the synthetic data, checkpoints, results and overlays (default ./demo_out/main)")
    job.add_argument("--epochs", type=int_at_least(1), default=45,
                     help="training epochs of 12 samples (default 45: a few minutes on 2 CPU cores; the reuse "
                          "gate starts reusing on still stretches)")
    add_batch_sequences_flag(job)
    add_threads_flag(job, default=main_job.JOB_THREADS,
                     why=" for the job's training and evaluation; docs/main-job.md's run used 2: the job's "
                         "floating-point results, and with them whether the gate meets its goals, change with the "
                         "thread count")
    return parser


# ---------------------------------------------------------------------------------------------
# Own video


def overlay_fps(fps_out: Optional[float], video_fps: Optional[float]) -> float:
    """Frame rate of the overlays: --fps-out if given, else the input video's, else DEFAULT_FPS_OUT."""
    if fps_out is not None:
        return float(fps_out)
    return float(video_fps) if video_fps else DEFAULT_FPS_OUT


def run_own_video(args: argparse.Namespace) -> dict:
    """Segment args.video from args.mask with args.model; write the outputs; return a summary."""
    if args.mask is None:
        raise UsageError("--mask is required with --video (the first frame's label PNG or a folder of them)")
    if args.model is None:
        raise UsageError("--model is required with --video (a G-FRTM checkpoint)")
    if args.batch_sequences > 1:
        raise UsageError("--batch-sequences: --video tracks one video; several sequences at a time are for the "
                         "main job's evaluation (no --video) and evaluate.py")
    if isinstance(args.TH, tuple):
        raise UsageError(f"--TH: one threshold with --video, got {len(args.TH)} (a list of thresholds is for "
                         f"the main job, or evaluate.py on annotated videos)")
    if not Path(args.model).expanduser().is_file():
        raise FileNotFoundError(f"--model: checkpoint not found: {args.model}")
    bw = args.backbone_weights
    if bw.lower() not in ("imagenet", "random", "none") and not Path(bw).expanduser().is_file():
        raise FileNotFoundError(f"--backbone-weights: no such file: {bw} (or use 'imagenet' / 'random')")
    device, _ = resolve_device(args.dev)

    frames = open_frames(args.video, flag="--video")
    masks = MaskSet(args.mask, flag="--mask")
    starts = masks.match(frames)
    height, width = frames.size
    size = processing_size(height, width, args.max_size)
    out = Path(args.out) if args.out is not None else Path("demo_out") / frames.name
    mask_dir = out / "masks"
    make_dirs(mask_dir, "the output folder", "--out")

    from models import build_tracker  # after the cheap checks
    tracker = build_tracker(str(Path(args.model).expanduser()), device=device, num_aug=args.num_aug,
                            backbone_weights=bw, seed=args.seed, precision=args.precision, compile=args.compile)

    resized = size != (height, width)
    print(f"{frames.name}: {width}x{height} frames"
          f"{f', tracked at {size[1]}x{size[0]}' if resized else ''}; objects {masks.object_ids}; "
          f"device {device}; threshold {args.TH}", flush=True)
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

        for result in tracker.track(read_ahead(feed), args.TH, keep_probabilities=False):
            stem, rgb = feed.pop()
            background.submit(mask_dir / f"{stem}.png", lambda s=stem, r=rgb, x=result.labels.numpy(): write(s, r, x))
            stats.add(result, stem)
            if stats.frames % 50 == 0:
                print(f"  {stats.frames} frames", flush=True)
        background.flush()
    stats.wall_seconds = time.perf_counter() - start
    unused = feed.unused()
    if unused:
        raise UsageError(f"--mask: the masks of frames {sorted(unused)[:5]} were never used: {args.video} "
                         f"has only {feed.count} frames")

    fps = stats.fps
    write_timeline(out / "timeline.json", fps, stats.timeline)
    save_timeline_png(out / "timeline.png", {"fps": fps, "frames": stats.timeline}, frames.name)
    reused, tracked = stats.reused, stats.tracked
    summary = {"video": str(args.video), "out": str(out), "frames": stats.frames, "fps": fps,
               "reused": reused, "tracked": tracked, "reuse_rate": stats.reuse_rate,
               "size": (height, width), "tracking_size": size, "fps_out": fps_out, "precision": args.precision,
               "wall_seconds": stats.wall_seconds, "wall_fps": stats.wall_fps}
    rate = f"{100.0 * reused / tracked:.1f}%" if tracked else "n/a"
    print(f"{stats.frames} frames, tracker {fps:.1f} FPS, wall {stats.wall_fps:.1f} FPS (reading, tracking and "
          f"writing), reuse {rate} ({reused}/{tracked} object-frames)")
    print(f"wrote {mask_dir}/*.png, {out / 'overlay.mp4'}, {out / 'overlay.gif'}, "
          f"{out / 'timeline.json'}, {out / 'timeline.png'}")
    return summary


def main(args: argparse.Namespace) -> dict:
    if args.video is not None:
        return run_own_video(args)
    if args.mask is not None:
        raise UsageError("--mask needs --video (the video the mask belongs to)")
    return main_job.run_main_job(args)


if __name__ == "__main__":
    run(main, get_parser())
