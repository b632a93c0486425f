"""torchrun for evaluation and training: the torch.distributed set-up (one device per local
rank, one time-out), rank 0 first, the sharding of evaluation's sequences over the ranks, and
the exchange of per-rank outcomes.

Launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE in the environment) each
process tracks its own share of the sequences (evaluation.tracking) or trains on its share of each
epoch's samples (trainers.trainer); without those variables everything runs in one process and
no process group is created. Backends: NCCL with one GPU per local rank on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence as SequenceType, TypeVar

import torch
import torch.distributed as dist

from lib.errors import UsageError

# How long a rank waits for the others in a collective. Long: in evaluation a rank that finished
# its share waits for the final exchange (a long benchmark on CPU takes hours); in training the
# others wait while rank 0 scans a data set's labels once. A rank that dies ends the job sooner,
# as torchrun then stops the others.
TIMEOUT = datetime.timedelta(hours=72)
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank among world_size processes, local_rank on its machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None  # None: one process, no process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer (set by torchrun)")


def launch_context() -> Context:
    """The ranks torchrun set in the environment (rank 0 of 1 when not launched by it)."""
    world = _env_int("WORLD_SIZE", 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return Context(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), local_world)


def wants_cuda(dev: Optional[str]) -> bool:
    """Whether --dev asks for CUDA (None / auto: CUDA when available)."""
    if dev is None or dev == "auto":
        return torch.cuda.is_available()
    return str(dev).startswith("cuda")


def rank_device(ctx: Context, dev: Optional[str]) -> Optional[str]:
    """--dev for this rank: with several ranks on CUDA, cuda:<local rank> (one GPU per local rank);
    UsageError when this machine has fewer GPUs than local ranks. Otherwise dev unchanged."""
    if not ctx.distributed or not wants_cuda(dev):
        return dev
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < ctx.local_world_size:
        raise UsageError(f"--dev {dev or 'auto'} with torchrun: {ctx.local_world_size} processes on this machine "
                         f"(--nproc_per_node) need one GPU each, but only {count} CUDA device(s) are visible; pass "
                         f"--nproc_per_node={count}" + (" or " if count else " ") + "--dev cpu")
    if dev not in (None, "auto", "cuda", f"cuda:{ctx.local_rank}"):
        raise UsageError(f"--dev {dev}: with torchrun each process uses the GPU of its local rank (cuda:<LOCAL_RANK>); "
                         f"pass --dev cuda (or leave --dev out), and choose GPUs with CUDA_VISIBLE_DEVICES")
    return f"cuda:{ctx.local_rank}"


def init(ctx: Context, device: torch.device) -> Context:
    """Join the process group (NCCL for a CUDA device, else gloo; time-out TIMEOUT); no-op for
    one process. Returns the context with its backend."""
    if not ctx.distributed:
        return ctx
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    return Context(ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, backend)


def leave_together(ctx: Context) -> None:
    """The barrier before leaving the process group: gloo can abort a rank (SIGABRT) that leaves
    while another still holds its connections. Every rank must reach it, rank 0 also on error."""
    all_gather(ctx, None)


def shutdown(ctx: Context) -> None:
    """Leave the process group (if one was joined)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def main_first(ctx: Context, fn: Callable[[], T]) -> T:
    """fn() on rank 0 first (it writes caches or data), then on the other ranks (they read them)."""
    if ctx.distributed and not ctx.is_main:
        all_gather(ctx, None)
    result = fn()
    if ctx.distributed and ctx.is_main:
        all_gather(ctx, None)
    return result


def shard(costs: Mapping[str, float], world_size: int) -> list[list[str]]:
    """Split sequences over world_size ranks, balanced by cost (frames x objects): longest first,
    each to the rank with the least work so far (ties: the lower rank; equal costs: by name).
    Deterministic, so every rank computes the same split. Returns the names per rank, each list
    longest first."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0.0] * world_size
    shards: list[list[str]] = [[] for _ in range(world_size)]
    for name in sorted(costs, key=lambda n: (-float(costs[n]), n)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(name)
        loads[rank] += float(costs[name])
    return shards


def sequence_cost(sequence) -> int:
    """Work of tracking a sequence: frames x objects."""
    return len(sequence) * max(1, len(sequence.obj_ids))


# What gloo and NCCL say when a collective fails because another process of the job is gone.
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "remote worker", "Broken pipe",
                     "NCCL communicator was aborted", "Socket Timeout")


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective's failure because another process of the job died: torch
    raises a plain RuntimeError (gloo) or a DistError (NCCL) there, told apart from a bug by its
    message."""
    if isinstance(exc, ConnectionError) or isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in PEER_LOST_MARKERS)


def all_gather(ctx: Context, value: Any) -> list:
    """Every rank's `value` (any picklable object), in rank order; [value] for one process.
    Also a barrier: returns only when every rank has called it. ConnectionError when another
    process is gone."""
    if not ctx.distributed:
        return [value]
    gathered: list = [None] * ctx.world_size
    try:
        dist.all_gather_object(gathered, value)
    except RuntimeError as exc:  # gloo / NCCL: a peer closed its connection or timed out
        raise ConnectionError(f"rank {ctx.rank} of {ctx.world_size}: the exchange with the other processes failed, "
                              f"probably because one of them died (see torchrun's report): {exc}") from exc
    return gathered


def first_failure(outcomes: SequenceType[Mapping], world_size: int) -> Optional[str]:
    """The error line for the first failed rank among the gathered outcomes ({"failure": None or
    {"sequence", "error"}} per rank, in rank order), or None when every rank succeeded."""
    failed = [(rank, o["failure"]) for rank, o in enumerate(outcomes) if o.get("failure")]
    if not failed:
        return None
    rank, f = failed[0]
    others = f"; {len(failed) - 1} other rank(s) failed too" if len(failed) > 1 else ""
    return f"rank {rank} of {world_size} failed on sequence {f['sequence']!r}: {f['error']}{others}"


class ErrorLine:
    """Which process of a torchrun job prints the run's one `error:` line: the first that claims
    it in torchrun's key-value store (the TCPStore its agent serves at MASTER_ADDR:MASTER_PORT,
    reachable before and after the process group). The others stay silent and wait until that
    line is out before they leave: torchrun stops every process (SIGTERM) as soon as one exits
    non-zero, so a process leaving early could stop the one about to print. Without torchrun's
    store (another launcher) every failing process prints."""

    # A store on this or the agent's machine answers in milliseconds; the wait covers a
    # reporter descheduled on a loaded machine, and ends sooner when torchrun stops this process.
    STORE_SECONDS = 30.0
    WAIT_SECONDS = 60.0

    def __init__(self, env: Mapping[str, str] = os.environ):
        self._env = env
        self._store = None
        self._connected = False

    def _connect(self):
        if not self._connected:
            self._connected = True
            env = self._env
            if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
                try:
                    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                          timeout=datetime.timedelta(seconds=self.STORE_SECONDS))
                    # One counter per run and restart (torchrun --max-restarts starts the workers again).
                    prefix = f"reuse-vos/error-line/{env.get('TORCHELASTIC_RUN_ID', '')}/" \
                             f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
                    self._store = dist.PrefixStore(prefix, store)
                except (RuntimeError, ValueError, OSError):
                    self._store = None  # the agent is gone: fall back to printing
        return self._store

    def claim(self) -> bool:
        """True for the first process of the job to call this (it prints), False for the others."""
        store = self._connect()
        if store is None:
            return True
        try:
            return store.add("claims", 1) == 1
        except (RuntimeError, OSError):
            return True

    def printed(self) -> None:
        """The claiming process wrote and flushed its line."""
        store = self._connect()
        if store is not None:
            try:
                store.set("printed", "1")
            except (RuntimeError, OSError):
                pass

    def wait_printed(self) -> None:
        """Wait (at most WAIT_SECONDS) until the claiming process has printed."""
        store = self._connect()
        if store is not None:
            try:
                store.wait(["printed"], datetime.timedelta(seconds=self.WAIT_SECONDS))
            except (RuntimeError, OSError):
                pass
