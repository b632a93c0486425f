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

from lib.cli import UsageError, int_at_least, number_in, positive_float, run
from evaluation.visuals import GIF_MAX_WIDTH, save_curve_png, write_visuals


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
    for flag, what in (("--results", "results directory: <seq>/<frame>.png label PNGs, optionally "
                                      "<seq>/timeline.json"),
                       ("--frames", "frame directory with <seq>/<frame>.jpg (or .jpeg/.png), e.g. DAVIS "
                                    "JPEGImages/480p")):
        parser.add_argument(flag, type=Path, default=None, help=f"{what} (required without a command)")
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


def draw_curves(args: argparse.Namespace) -> Path:
    """`visualize.py curve`: the sweeps' curves in one figure; returns its path."""
    from evaluation.sweep import read_curve

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
    """Write the overlays and timelines (evaluation.visuals.write_visuals); return {seq: [written
    paths]}. With `curve`: the curves' figure (draw_curves); returns its path."""
    if args.command == "curve":
        return draw_curves(args)
    if args.curves or args.labels:
        raise UsageError(f"{' '.join(map(str, args.curves or args.labels))}: RESULTS_DIR and --labels need the "
                         f"`curve` command (python visualize.py curve RESULTS_DIR...)")
    if args.results is None or args.frames is None:
        raise UsageError("--results and --frames are required (or use `python visualize.py curve RESULTS_DIR...`)")
    return write_visuals(args.results, args.frames, args.out, args.sequences, mp4=args.mp4, gif=args.gif,
                         timeline=args.timeline, fps_out=args.fps_out, alpha=args.alpha, gif_width=args.gif_width)


if __name__ == "__main__":
    run(main, get_parser())
