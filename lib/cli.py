"""Argument types, device resolution and the error handling shared by the scripts."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Optional

import torch


def number_in(low: float, high: float, what: str = "") -> Callable[[str], float]:
    """argparse type: a float in [low, high] (NaN rejected)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in [{low:g}, {high:g}], got {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}]{what}, got {text!r}")
        return value
    parse.__name__ = f"number in [{low:g}, {high:g}]"
    return parse


# The reuse threshold TH (upstream parsed it as a string).
threshold = number_in(0.0, 1.0, " (reuse iff p_reuse > TH; 1 never reuses)")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def image_size(minimum: int = 16) -> Callable[[str], tuple[int, int]]:
    """argparse type: HxW, e.g. 480x854, each side >= minimum -> (H, W)."""
    def parse(text: str) -> tuple[int, int]:
        try:
            h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be HxW, e.g. 480x854, got {text!r}")
        if h < minimum or w < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}x{minimum}, got {text!r}")
        return h, w
    parse.__name__ = "HxW size"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def resolve_device(dev: Optional[str]) -> tuple[torch.device, str]:
    """(device, description) for --dev. None / "auto": cuda:0 if available, else cpu."""
    if dev is None or dev == "auto":
        dev, why = ("cuda:0", "default: CUDA available") if torch.cuda.is_available() else \
            ("cpu", "default: CUDA not available")
    else:
        why = "--dev"
    try:
        device = torch.device(dev)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--dev {dev!r} is not a device ({exc}); use e.g. cuda:0 or cpu") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--dev {dev}: CUDA is not available on this machine (torch {torch.__version__}); "
                             f"use --dev cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"--dev {dev}: only {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", index)
        name = torch.cuda.get_device_name(index)
    elif device.type == "cpu":
        name = f"CPU, {torch.get_num_threads()} threads"
    else:
        name = device.type
    return device, f"{device} ({name}; {why})"


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        interrupted: str = "interrupted") -> None:
    """Parse the command line and run main(args): a FileNotFoundError / ValueError becomes one
    `error: ...` line on stderr and exit status 2 (no traceback); Ctrl-C exits 130.
    (FloatingPointError: training stopped on a non-finite loss.)"""
    try:
        main(parser.parse_args())
    except (FileNotFoundError, ValueError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        sys.exit(130)
