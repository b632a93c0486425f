"""Compiled frame regions (`--compile`, `build_tracker(..., compile=True)`; docs/performance.md).

`CompiledRegions` is the second implementation of the tracker's regions (models.regions): the
same per-frame steps, each `torch.compile(fn, fullgraph=True, dynamic=False)` of the eager
callable (the target models' scores and filter re-optimisation are functions of a
`TargetModelTable`'s stacked weights and buffers, so one compiled graph serves every set of
objects of one count). The network and the backbone are not touched: the eager path stays
as it is, and a graph break is an error, not a silent fall-back. A crash of the code generator
(`COMPILER_FAILURES`) leaves that region eager from then on, said once on stderr.

Each region compiles once per input shape (frame size, number of objects in a batch; the target
models' regions, and on CUDA the network's too, take power-of-two batches: `row_buckets`); on
CUDA with `mode="reduce-overhead"`, so a region replays as a CUDA graph, its outputs cloned (a
replay overwrites the previous outputs, and objects keep them across frames). The memory insert
and object starts (backbone on the augmented first frame, template, deep decoder stages, the
joint initialisation) stay eager (`Regions`' start steps).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError
from torch.utils._pytree import tree_map_only

from lib.fileio import make_dirs

from .backbone import Backbone
from .network import GFRTM
from .regions import GATE_STEPS, Regions

# A code generator's crash, as opposed to a graph break (torch._dynamo.exc.Unsupported).
COMPILER_FAILURES = (BackendCompilerFailed, InductorError)

RECOMPILE_LIMIT = 256  # compiled shapes per region (frame sizes x object counts) before torch gives up

DEFAULT_CACHE = Path("~/.cache/reuse-vos/inductor")


def cache_dir() -> Path:
    """Where inductor keeps its compiled code: $TORCHINDUCTOR_CACHE_DIR when set, else
    ~/.cache/reuse-vos/inductor (set as $TORCHINDUCTOR_CACHE_DIR for this process), so that a
    second run loads the compiled kernels instead of building them."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its own default (/tmp/torchinductor_<user>) into the variable once it looked
    # it up: that one is not the user's choice
    if not given or os.path.abspath(given) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(DEFAULT_CACHE.expanduser())
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return make_dirs(path, "the compile cache folder", "$TORCHINDUCTOR_CACHE_DIR")


def set_global_switches(device: torch.device) -> None:
    """What is set once for the process instead of inside the regions: inductor's freezing
    (the frozen weights become constants it can fold and lay out), recompile limits high enough
    for a data set of many frame sizes, and on CUDA full fp32 matmuls and convolutions (the
    tracker's fp32; `precision.full_fp32` then has nothing left to switch)."""
    import torch._dynamo.config
    import torch._inductor.config

    torch._inductor.config.freezing = True
    # Past the limit torch would run the region eagerly from then on, with only a log warning.
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           16 * RECOMPILE_LIMIT)
    if device.type == "cuda":
        from lib.precision import _tf32_switches
        for namespace, name, value in _tf32_switches():
            setattr(namespace, name, value)


class CompiledRegions(Regions):
    """The regions of one tracker compiled (see the module docstring), and the time spent
    compiling them. backend: "inductor" (generated kernels; CUDA graphs on CUDA) or e.g.
    "aot_eager" (no code generation: checks that every region traces as one graph)."""

    def __init__(self, network: GFRTM, backbone: Backbone, device: torch.device, backend: str = "inductor"):
        super().__init__(network, backbone)
        if backend == "inductor":
            cache_dir()
        set_global_switches(device)
        self.device = device
        self.backend = backend
        self.cudagraphs = device.type == "cuda" and backend == "inductor"
        # Object batches padded to powers of two for the network's regions: on CUDA (few graphs to
        # capture); on the CPU the padded rows' arithmetic would cost more than compiling per count.
        self.row_buckets = self.cudagraphs
        self.static_shapes = True  # the target models' regions: every memory slot, power-of-two rows
        self.compile_seconds = 0.0  # total, every region and shape
        self.pending: list[str] = []  # regions compiled since the last report
        self.pending_seconds = 0.0
        self.compiled_shapes: dict[str, int] = {}  # region name -> graphs compiled (input shapes seen)
        self.failed: dict[str, str] = {}  # region name -> the compiler's error; such a region runs eagerly
        skipped = () if network.has_gate else GATE_STEPS  # never called without a gate
        self.steps = {name: fn if name in skipped else self.compile(name, fn) for name, fn in self.steps.items()}

    def compile(self, name: str, fn: Callable) -> Callable:
        """`fn` compiled whole (fullgraph) for static shapes, timed on the calls that compile."""
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend,
                                 mode="reduce-overhead" if self.cudagraphs else None)
        from torch._dynamo.utils import counters

        def region(*args, **kwargs):
            if name in self.failed:
                return fn(*args, **kwargs)
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            if self.cudagraphs:  # every call a new step: its outputs are cloned below
                torch.compiler.cudagraph_mark_step_begin()
            try:
                out = compiled(*args, **kwargs)
            except COMPILER_FAILURES as exc:
                # A bug of the code generator, not of the region (a graph break raises elsewhere):
                # that region runs eagerly from now on, said once.
                self.failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                print(f"--compile: compiling {name} failed ({self.failed[name]}); it runs eagerly from now on",
                      file=sys.stderr, flush=True)
                return fn(*args, **kwargs)
            if self.cudagraphs:
                out = tree_map_only(torch.Tensor, torch.clone, out)
            if counters["stats"]["unique_graphs"] != graphs:
                seconds = time.perf_counter() - start
                self.compile_seconds += seconds
                self.pending_seconds += seconds
                self.pending.append(name)
                self.compiled_shapes[name] = self.compiled_shapes.get(name, 0) + 1
            return out

        region.__name__ = name
        return region

    def report(self, sizes) -> None:
        """One stderr line when regions were compiled since the last report (a new frame size or
        object count): which, for which frame sizes (H, W), and how long it took."""
        if not self.pending:
            return
        shown = ", ".join(f"{h}x{w}" for h, w in sizes)
        print(f"--compile: {self.pending_seconds:.1f} s compiling {', '.join(dict.fromkeys(self.pending))} "
              f"for {shown} frames ({self.compile_seconds:.1f} s in all; cache {cache_dir()})",
              file=sys.stderr, flush=True)
        self.pending, self.pending_seconds = [], 0.0
