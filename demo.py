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

Without --video: the default main job (synthetic data -> training -> evaluation -> overlay).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional


from lib.background import BackgroundWriter, read_ahead
from lib.cli import (UsageError, add_backbone_weights_flag, add_device_flag, add_num_aug_flag, add_precision_flag,
                     add_seed_flag, add_threads_flag, add_threshold_flag, cpu_threads, int_at_least, options,
                     positive_float, resolve_device, run)
from lib.gate_report import format_summary, gate_report
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
    add_threads_flag(job, default=JOB_THREADS,
                     why=" for the job's training and evaluation; the README's run used 2: the job's "
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
    mask_dir.mkdir(parents=True, exist_ok=True)

    from models import build_tracker  # after the cheap checks
    tracker = build_tracker(str(Path(args.model).expanduser()), device=device, num_aug=args.num_aug,
                            backbone_weights=bw, seed=args.seed, precision=args.precision)

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


# ---------------------------------------------------------------------------------------------
# Default main job

# The main job's data and training, sized for a few minutes on 2 CPU cores (README: main job).
JOB_SIZE = (120, 216)  # H, W of every frame
# Training: DAVIS layout, stop-and-go motion with long holds (most frame pairs still), all frames annotated.
JOB_TRAIN = {"sequences": 4, "frames": 12, "hold": (0.8, 1.0)}
# Validation: folder in the YouTube-VOS layout, every frame annotated (J&F on every frame), the
# second object entering at frame `enter_at`.
JOB_VAL = {"sequences": 3, "frames": 40, "enter_at": 10}
# train.py options; the learning rate is train.py's (upstream's) 5e-4.
JOB_TRAIN_OPTIONS = {"batch_size": 2, "samples_per_epoch": 12, "num_aug": 1}
JOB_THREADS = 2  # the README's report was made with 2 threads; other counts give other floats
# Timing runs per threshold for the FPS goal, alternating TH 1.0 and the gate's (medians): one run
# each, back to back, was at the mercy of a shared machine's drift (1.08x in one run, 0.97x in the next).
JOB_TIMING_RUNS = 3
GOAL_REUSE = 0.20  # reuse rate at the gate's threshold at least this
GOAL_JF_POINTS = 3.0  # J&F at the gate's threshold at most this many points below TH 1.0


def time_thresholds(evaluation: argparse.Namespace, thresholds: tuple[float, ...], runs: int) -> dict[float, dict]:
    """The speed of evaluate.py's tracker (the checkpoint and settings of `evaluation`, evaluate.py
    options) at each threshold, measured as evaluate.py's threshold sweeps measure it
    (lib.sweep.timed_runs): the videos, decoded once into memory, are tracked at each threshold in
    turn, `runs` times, so that the drift of a shared machine hits every threshold alike.
    -> {threshold: {"fps": the median over the runs of frames / tracker time (evaluate.py's FPS),
    "fps_runs": [...], "reuse_rate": ...}}."""
    from lib.distributed import Context
    from lib.evaluation import build_tracker, prepare
    from lib.sweep import combine_timings, timed_runs

    job = prepare(evaluation, Context(), *resolve_device(evaluation.dev))  # as evaluate.py, one process
    videos = {seq.name: [seq[t] for t in range(len(seq))] for seq in job.data.sequences}
    speed = combine_timings([timed_runs(build_tracker(job), videos, thresholds, runs)], thresholds)
    return {th: {k: speed[th][k] for k in ("fps", "fps_runs", "reuse_rate")} for th in thresholds}


def _fps_runs(th: float, speed: dict) -> str:
    return f"TH {th!r}: " + ", ".join(f"{fps:.1f}" for fps in speed["fps_runs"])


def main_job_goals(plain: dict, gated: dict, speed: dict[float, dict]) -> list[tuple[str, bool]]:
    """The main job's goals, as (line, met) pairs, from evaluate.main's results at TH 1.0 (plain)
    and at the gate's threshold (gated), and the FPS of both from time_thresholds (speed)."""
    th = gated["threshold"]
    reuse = gated["reuse_rate"]
    drop = 100 * (plain["J&F"] - gated["J&F"])
    fps, fps_plain = speed[th]["fps"], speed[1.0]["fps"]
    return [
        (f"reuse rate at TH {th:g} >= {100 * GOAL_REUSE:.0f}%: {100 * reuse:.1f}%", reuse >= GOAL_REUSE),
        (f"J&F at TH {th:g} within {GOAL_JF_POINTS:g} points of TH 1.0: {100 * gated['J&F']:.1f} vs "
         f"{100 * plain['J&F']:.1f} ({-drop:+.1f})", drop <= GOAL_JF_POINTS),
        (f"FPS at TH {th:g} above TH 1.0: {fps:.1f} vs {fps_plain:.1f} ({fps / fps_plain:.2f}x)", fps > fps_plain),
    ]


def side_by_side(plain: dict, gated: dict, speed: dict[float, dict]) -> str:
    """The report table: J&F, J, F, FPS (from time_thresholds) and reuse rate at TH 1.0 and at
    the gate's threshold."""
    def pct(value: float) -> str:
        return f"{100 * value:.1f}"
    rows = [("J&F", pct(plain["J&F"]), pct(gated["J&F"])),
            ("  J mean", pct(plain["J"]["mean"]), pct(gated["J"]["mean"])),
            ("  F mean", pct(plain["F"]["mean"]), pct(gated["F"]["mean"])),
            ("FPS", f"{speed[1.0]['fps']:.1f}", f"{speed[gated['threshold']]['fps']:.1f}"),
            ("reuse rate", pct(plain["reuse_rate"]) + "%", pct(gated["reuse_rate"]) + "%")]
    head = ("", "TH 1.0 (always compute)", f"TH {gated['threshold']:g} (reuse gate)")
    lines = [f"{head[0]:<12}{head[1]:>26}{head[2]:>26}"]
    lines += [f"{name:<12}{a:>26}{b:>26}" for name, a, b in rows]
    return "\n".join(lines)


def run_main_job(args: argparse.Namespace) -> dict:
    """The default main job, offline: write synthetic data (stop-and-go motion: objects holding
    still, then dashing, crossing each other, one entering late), train G-FRTM on it briefly
    (random backbone), evaluate it at TH 1.0 and at --TH (J&F, reuse rate), time both in turn
    (FPS), print them side by side with the goals met or not, and write overlays and reuse
    timelines of the --TH run. A demonstration of the pipeline and of the reuse gate, not the
    paper's numbers. Runs on args.threads CPU threads (torch's own count is restored afterwards)."""
    with cpu_threads(args.threads):
        return _main_job(args)


def _main_job(args: argparse.Namespace) -> dict:
    import evaluate
    import train
    import visualize
    from dataset.synthetic import make_davis_like
    from dataset.synthetic_layouts import make_folder_like

    work = Path(args.work)
    train_data, val_data = work / "synthetic-train", work / "synthetic-val"
    dev = str(resolve_device(args.dev)[0])
    if not (train_data / "ImageSets").is_dir():
        print(f"[1/6] writing synthetic data: {JOB_TRAIN['sequences']} training sequences (DAVIS layout) to "
              f"{train_data}, {JOB_VAL['sequences']} validation videos (YouTube-VOS layout, every frame "
              f"annotated) to {val_data}")
        make_folder_like(val_data, "ytvos", num_sequences=JOB_VAL["sequences"], num_frames=JOB_VAL["frames"],
                         size=JOB_SIZE, seed=args.seed, annotated="all", enter_at=JOB_VAL["enter_at"],
                         motion="stop-and-go")
        make_davis_like(train_data, num_sequences=0, num_frames=JOB_TRAIN["frames"], size=JOB_SIZE, num_objects=2,
                        seed=args.seed, num_train_sequences=JOB_TRAIN["sequences"], motion="stop-and-go",
                        hold=JOB_TRAIN["hold"])
    print(f"[2/6] training for {args.epochs} short epochs on the synthetic set (random backbone; "
          f"{args.threads} CPU threads, --threads)")
    train.main(options(
        train.get_parser(), name="demo", dset="synthetic", synthetic_root=train_data,
        checkpoints=work / "checkpoints", tensorboard=work / "tensorboard", tmcache=work / "tmcache",
        cache_dir=work / "cache", size=JOB_SIZE, epochs=args.epochs, keep_checkpoints=1, workers=0,
        backbone_weights="random",
        seed=args.seed, dev=dev, precision=args.precision, **JOB_TRAIN_OPTIONS))
    checkpoint = work / "checkpoints" / "demo" / f"demo_ep{args.epochs:04d}.pth"
    listed = args.TH if isinstance(args.TH, tuple) else (args.TH,)
    gate_th = next((th for th in listed if th < 1.0), listed[0])  # the goals are checked here
    thresholds = tuple(dict.fromkeys((1.0,) + listed))

    def evaluation(th) -> argparse.Namespace:  # evaluate.py's options at TH th (a float, or a tuple: a sweep)
        return options(evaluate.get_parser(), model=str(checkpoint), dset="ytvos-layout", data_root=val_data,
                       output_root=work, TH=th, num_aug=args.num_aug, backbone_weights="random", seed=args.seed,
                       dev=dev, precision=args.precision, timing_runs=JOB_TIMING_RUNS)
    if len(listed) > 1:
        print(f"[3-5/6] evaluating and timing {checkpoint.name} at TH {', '.join(map(repr, thresholds))} on the "
              f"synthetic validation videos (evaluate.py's threshold sweep: {JOB_TIMING_RUNS} timing runs)")
        swept = evaluate.main(evaluation(thresholds))
        results, speed = swept["thresholds"], swept["timing"]
    else:
        results = {}
        for step, th in (("3", 1.0), ("4", gate_th)):
            print(f"[{step}/6] evaluating {checkpoint.name} at TH {th!r} on the synthetic validation videos")
            results[th] = evaluate.main(evaluation(th))
        print(f"[5/6] timing: the validation videos tracked at TH {' and TH '.join(map(repr, thresholds))} "
              f"in turn, {JOB_TIMING_RUNS} times each (FPS: the median run)")
        speed = time_thresholds(evaluation(gate_th), thresholds, JOB_TIMING_RUNS)
    plain, gated = results[1.0], results[gate_th]
    print(f"[6/6] overlays and reuse timelines (TH {gate_th:g})")
    written = visualize.main(options(visualize.get_parser(), results=Path(gated["results_dir"]),
                                     frames=val_data / "JPEGImages", out=work / "overlays"))
    goals = main_job_goals(plain, gated, speed)
    gate = gate_report(gated["results_dir"], plain["results_dir"], val_data / "Annotations")
    print("\n" + side_by_side(plain, gated, speed))
    print(f"FPS: frames / tracker time as evaluate.py measures it, the median of {JOB_TIMING_RUNS} runs that "
          f"alternated between the thresholds ({'; '.join(_fps_runs(th, speed[th]) for th in thresholds)}); "
          f"evaluate.py's single runs above: {plain['fps']:.1f} and {gated['fps']:.1f}")
    print("goals:")
    for line, met in goals:
        print(f"  [{'met' if met else 'NOT met'}] {line}")
    print(f"the gate at TH {gate_th:g} (lib.gate_report):")
    print("\n".join("  " + line for line in format_summary(gate).splitlines()))
    print(f"masks and metrics: {plain['results_dir']}, {gated['results_dir']}\n"
          f"overlays and reuse timelines: {work / 'overlays'}")
    print("These numbers come from a random backbone trained for a few minutes on synthetic data: they "
          "show the pipeline and what the reuse gate does, not the paper's results (see README: Reproducing "
          "the published tables).")
    return {"results": gated, "results_plain": plain, "speed": speed, "goals": goals, "gate": gate,
            "overlays": written, "checkpoint": str(checkpoint)}


def main(args: argparse.Namespace) -> dict:
    if args.video is not None:
        return run_own_video(args)
    if args.mask is not None:
        raise UsageError("--mask needs --video (the video the mask belongs to)")
    return run_main_job(args)


if __name__ == "__main__":
    run(main, get_parser())
