"""Overlays (MP4 / GIF) and reuse timelines from any results directory.

    python visualize.py --results result/<name> --frames /path/DAVIS/JPEGImages/480p

A results directory holds <seq>/<frame>.png label PNGs (as evaluate.py and demo.py write them)
and, optionally, <seq>/timeline.json. For every sequence (or those given with --sequences) it
writes <out>/<seq>/overlay.mp4, <out>/<seq>/overlay.gif and, where timeline.json exists,
<out>/<seq>/timeline.png. Frames are read from <frames>/<seq>/<frame>.jpg (or .jpeg / .png);
masks whose size differs from the frame's (same aspect ratio) are resized (nearest).

    python visualize.py curve RESULTS_DIR... [--labels NAME...] [--out curves.png]

draws the trade-off curves of finished threshold sweeps (evaluate.py --TH 1.0,0.9,...: folders
holding curve.csv, or curve.csv files) in one figure: J&F against FPS and against GFLOPs per frame.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from lib.cli import UsageError, int_at_least, number_in, positive_float, run
from lib.image_io import read_image, read_label_png, resize_labels_nearest_exact
from lib.video_io import natural_key, same_aspect
from lib.visualize import GIF_MAX_WIDTH, load_timeline, save_curve_png, save_timeline_png, write_overlays

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Overlay result masks on their frames (MP4 / GIF) and draw reuse timelines; or, with "
                    "`curve RESULTS_DIR...`, draw the J&F / speed / FLOPs curves of threshold sweeps in one figure.")
    parser.add_argument("command", nargs="?", choices=("curve",), default=None,
                        help="`curve`: draw the curves of the sweeps given after it (overlays and timelines "
                             "need no command)")
    parser.add_argument("curves", nargs="*", type=Path, default=[], metavar="RESULTS_DIR",
                        help="with `curve`: folders holding curve.csv (evaluate.py --TH 1.0,0.9,...: "
                             "<output root>/result/<dset>-<model stem>_curve[_fast]) or curve.csv files")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                        help="with `curve`: one legend name per RESULTS_DIR (default: the folder names)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results directory: <seq>/<frame>.png label PNGs, optionally <seq>/timeline.json "
                             "(required without a command)")
    parser.add_argument("--frames", type=Path, default=None,
                        help="frame directory with <seq>/<frame>.jpg (or .jpeg/.png), e.g. DAVIS JPEGImages/480p "
                             "(required without a command)")
    parser.add_argument("--sequences", nargs="+", default=None, metavar="SEQ",
                        help="sequences to draw (default: every folder of --results holding PNGs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default <results>/vis): <seq>/overlay.mp4, "
                             "<seq>/overlay.gif, <seq>/timeline.png; with `curve`: the figure's path "
                             "(default ./curves.png)")
    parser.add_argument("--gif", action=argparse.BooleanOptionalAction, default=True,
                        help="write <seq>/overlay.gif (default: on)")
    parser.add_argument("--mp4", action=argparse.BooleanOptionalAction, default=True,
                        help="write <seq>/overlay.mp4 (default: on)")
    parser.add_argument("--timeline", action=argparse.BooleanOptionalAction, default=True,
                        help="write <seq>/timeline.png where <seq>/timeline.json exists (default: on)")
    parser.add_argument("--fps-out", type=positive_float, default=10.0,
                        help="frame rate of the MP4 and GIF (default 10)")
    parser.add_argument("--alpha", type=number_in(0.0, 1.0), default=0.5,
                        help="opacity of the object colours, 0..1 (default 0.5)")
    parser.add_argument("--gif-width", type=int_at_least(16), default=GIF_MAX_WIDTH,
                        help=f"maximum GIF width in pixels, wider frames are scaled down (default {GIF_MAX_WIDTH})")
    return parser


def _mask_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"
             and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def list_sequences(results: Path, skip: Optional[Path] = None) -> list[str]:
    """Folders of `results` that hold label PNGs, sorted (the output folder excluded)."""
    skip_resolved = skip.resolve() if skip is not None else None
    names = []
    for d in results.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        if skip_resolved is not None and d.resolve() == skip_resolved:
            continue
        if _mask_files(d):
            names.append(d.name)
    return sorted(names, key=natural_key)


def _frame_path(frames: Path, seq: str, stem: str) -> Path:
    for suffix in FRAME_SUFFIXES:
        path = frames / seq / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"--frames: no frame {frames / seq / stem}.jpg (or .jpeg / .png) for the "
                            f"result mask {seq}/{stem}.png")


def _pairs(results: Path, frames: Path, seq: str):
    for mask_path in _mask_files(results / seq):
        image = read_image(_frame_path(frames, seq, mask_path.stem))
        labels = read_label_png(mask_path)
        if labels.shape != image.shape[:2]:
            if not same_aspect(labels.shape, image.shape[:2]):
                raise UsageError(f"--results: mask {mask_path} is {labels.shape[1]}x{labels.shape[0]} but its "
                                 f"frame is {image.shape[1]}x{image.shape[0]} (another resolution of the frames?)")
            labels = resize_labels_nearest_exact(labels, image.shape[:2])
        yield image, labels


def draw_curves(args: argparse.Namespace) -> Path:
    """`visualize.py curve`: the sweeps' curves in one figure; returns its path."""
    from lib.sweep import read_curve

    if not args.curves:
        raise UsageError("curve: give one or more RESULTS_DIR (folders holding curve.csv)")
    labels = args.labels or [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in args.curves]
    if len(labels) != len(args.curves):
        raise UsageError(f"--labels: {len(labels)} name(s) for {len(args.curves)} RESULTS_DIR(s); give one per folder")
    curves = []
    for label, path in zip(labels, args.curves):
        try:
            curves.append((label, read_curve(path)))
        except ValueError as exc:
            raise UsageError(f"RESULTS_DIR {path}: {exc}") from exc
    out = Path(args.out) if args.out is not None else Path("curves.png")
    save_curve_png(out, curves, title="J&F against speed and FLOPs over the reuse threshold")
    print(f"wrote {out} ({len(curves)} curve(s))")
    return out


def main(args: argparse.Namespace):
    """Write the overlays and timelines; return {seq: [written paths]}. With `curve`: the
    curves' figure (draw_curves); returns its path."""
    if args.command == "curve":
        return draw_curves(args)
    if args.curves or args.labels:
        raise UsageError(f"{' '.join(map(str, args.curves or args.labels))}: RESULTS_DIR and --labels need the "
                         f"`curve` command (python visualize.py curve RESULTS_DIR...)")
    if args.results is None or args.frames is None:
        raise UsageError("--results and --frames are required (or use `python visualize.py curve RESULTS_DIR...`)")
    results, frames = Path(args.results), Path(args.frames)
    if not results.is_dir():
        raise FileNotFoundError(f"--results: no such directory: {results}")
    if not frames.is_dir():
        raise FileNotFoundError(f"--frames: no such directory: {frames}")
    out = Path(args.out) if args.out is not None else results / "vis"
    if out.resolve() == results.resolve() or (out.is_dir() and _mask_files(out)):
        raise UsageError(f"--out {out} must not be the results directory or a folder of label PNGs "
                         f"(its outputs would be taken for results)")
    if args.sequences:
        sequences = list(args.sequences)
        for seq in sequences:
            if not (results / seq).is_dir():
                raise FileNotFoundError(f"--sequences: no results for {seq!r} ({results / seq} does not exist)")
            if not _mask_files(results / seq):
                raise UsageError(f"--sequences: {results / seq} holds no label PNGs")
    else:
        sequences = list_sequences(results, skip=out)
        if not sequences:
            raise UsageError(f"--results: {results} has no <seq>/ folder holding label PNGs")
    for seq in sequences:
        if not (frames / seq).is_dir():
            raise FileNotFoundError(f"--frames: no frame folder {frames / seq} for sequence {seq}")

    written: dict[str, list[str]] = {}
    for seq in sequences:
        target = out / seq
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        mp4 = target / "overlay.mp4" if args.mp4 else None
        gif = target / "overlay.gif" if args.gif else None
        if mp4 is not None or gif is not None:
            count = write_overlays(_pairs(results, frames, seq), mp4, gif, args.fps_out, args.alpha,
                                   args.gif_width)
            paths += [str(p) for p in (mp4, gif) if p is not None]
        else:
            count = len(_mask_files(results / seq))
        timeline_json = results / seq / "timeline.json"
        if args.timeline and timeline_json.is_file():
            save_timeline_png(target / "timeline.png", load_timeline(timeline_json), seq)
            paths.append(str(target / "timeline.png"))
        written[seq] = paths
        print(f"{seq}: {count} frames -> {', '.join(paths) if paths else 'nothing (all outputs off)'}")
    return written


if __name__ == "__main__":
    run(main, get_parser())
