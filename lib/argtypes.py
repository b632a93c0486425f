"""argparse types that check a flag's value and say what was expected (imports nothing of the
project, so that data generators and scripts alike can use them; `lib.cli` re-exports them)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


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


def int_in(low: int, high: Optional[int] = None, what: str = "") -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (high None: no upper bound)."""
    wanted = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}{what}, got {text!r}")
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}{what}, got {text!r}")
        return value
    parse.__name__ = wanted[3:]
    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= minimum."""
    return int_in(minimum)


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


def max_size(text: str) -> int:
    """argparse type of --max-size: 0 (never resize) or at least 32 pixels."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer (pixels, 0 = never resize), got {text!r}")
    if value != 0 and value < 32:
        raise argparse.ArgumentTypeError(f"must be 0 (never resize) or at least 32 pixels, got {value}")
    return value
