"""python -m tools.synthetic_data: write a seeded synthetic VOS data set (dataset.synthetic) in the
DAVIS or the YouTube-VOS layout."""
from __future__ import annotations

import argparse
from pathlib import Path

from dataset.synthetic import MOTIONS, make_davis_like, make_ytvos_like
from lib.argtypes import image_size, int_in


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a seeded synthetic VOS data set.")
    parser.add_argument("--out", required=True, type=Path, help="output root directory")
    parser.add_argument("--layout", required=True, choices=("davis", "ytvos"),
                        help="davis: the DAVIS 2017 layout; ytvos: the YouTube-VOS 2018 layout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the content (default 0)")
    parser.add_argument("--sequences", type=int, default=3, help="number of val sequences")
    parser.add_argument("--train-sequences", type=int, default=2, help="number of train sequences")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per sequence (default 12 for davis, 26 for ytvos)")
    parser.add_argument("--size", type=image_size(16), default=(120, 216), help="HxW, default 120x216")
    parser.add_argument("--objects", type=int_in(1, 254), default=2, help="objects per sequence (1..254)")
    parser.add_argument("--motion", choices=MOTIONS, default="smooth",
                        help="smooth (default): panning camera, objects moving smoothly; stop-and-go: still "
                             "camera, objects holding still (slow drift) between fast dashes")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.layout == "davis":
        names = make_davis_like(args.out, args.sequences, args.frames or 12, args.size, args.objects,
                                args.seed, num_train_sequences=args.train_sequences, motion=args.motion)
        print(f"wrote DAVIS-layout data to {args.out}: val sequences {names}")
    else:
        lists = make_ytvos_like(args.out, args.sequences, args.frames or 26, args.size, args.objects,
                                args.seed, num_train_sequences=args.train_sequences, motion=args.motion)
        print(f"wrote YouTube-VOS-layout data to {args.out}: {lists}")


if __name__ == "__main__":
    main(get_parser().parse_args())
