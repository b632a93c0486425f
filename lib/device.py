"""The device and thread helpers: --dev resolved to a torch device, torch's CPU thread count for a block."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from lib.errors import UsageError


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
        raise UsageError(f"--dev {dev!r} is not a device ({exc}); use e.g. cuda:0 or cpu") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--dev {dev}: CUDA is not available on this machine (torch {torch.__version__}); "
                             f"use --dev cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UsageError(f"--dev {dev}: only {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", index)
        name = torch.cuda.get_device_name(index)
    elif device.type == "cpu":
        name = f"CPU, {torch.get_num_threads()} threads"
    else:
        name = device.type
    return device, f"{device} ({name}; {why})"


@contextlib.contextmanager
def cpu_threads(count: Optional[int]) -> Iterator[None]:
    """Run the block on `count` torch CPU threads (None: leave torch's count), then restore
    torch's count, so that a caller in the same process (a test, a notebook) keeps its own."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
