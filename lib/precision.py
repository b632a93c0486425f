"""Numeric precision of the tracker and training (`--precision fp32|bf16|fp16`).

Reduced precision runs the network and the backbone under autocast (channels-last); the target
model and the merge of object probabilities always run in full fp32 (`full_fp32`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lib.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")  # the values of --precision
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_supports_fp16() -> bool:
    """True where oneDNN has fast fp16 kernels on this CPU (AVX512-FP16 / AMX-FP16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None for fp32), or a UsageError (a
    ValueError) that names the flag and what to use instead when this device cannot run it (well)."""
    device = torch.device(device)
    if precision not in _DTYPES:
        raise UsageError(f"unknown precision {precision!r} (--precision): use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "fp16" and not _cpu_supports_fp16():
            raise UsageError("--precision fp16 is not faster than fp32 on this CPU (no AVX512-FP16/AMX-FP16): "
                             "use --precision bf16 (fast on CPUs with AVX512-BF16 or AMX) or fp32")
    elif device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise UsageError(f"--precision bf16 needs a GPU with bfloat16 support, which "
                             f"{torch.cuda.get_device_name(device)} lacks: use --precision fp16 or fp32")
    else:
        raise UsageError(f"--precision {precision} is supported on cpu and cuda devices, not {device.type}: "
                         f"use --precision fp32")
    return _DTYPES[precision]


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`; for fp32 (dtype None) full fp32 (`full_fp32`: fp32 means
    fp32, also where cuDNN would use TF32)."""
    if dtype is None:
        return full_fp32(device)
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _tf32_switches() -> list[tuple[object, str, object]]:
    """(namespace, attribute, full-fp32 value) of the CUDA TF32 switches this torch has."""
    cuda = torch.backends.cuda.matmul
    if hasattr(cuda, "fp32_precision"):  # torch >= 2.9 API; mixing it with allow_tf32 is an error
        return [(cuda, "fp32_precision", "ieee"), (torch.backends.cudnn.conv, "fp32_precision", "ieee")]
    return [(cuda, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def full_fp32(device: torch.device | str) -> Iterator[None]:
    """Full fp32 on `device`: autocast off and, on CUDA, no TF32 in matmuls and cuDNN
    convolutions (cuDNN uses TF32 by default, which reaches the target model's 1x1 projection
    inside the Gauss-Newton solver)."""
    device = torch.device(device)
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        switches = _tf32_switches()
        saved = [getattr(ns, name) for ns, name, _ in switches]
        for ns, name, value in switches:
            setattr(ns, name, value)
        try:
            yield
        finally:
            for (ns, name, _), value in zip(switches, saved):
                setattr(ns, name, value)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> `device` without making the host wait: on CUDA through pinned memory with
    non_blocking; on the CPU the tensor itself (nothing to copy)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
