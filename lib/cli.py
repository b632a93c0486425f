"""What the scripts share (imported by the scripts only): the flags several scripts take (declared
once in `lib.flags`, which needs no PyTorch, re-exported here; `--precision`, which needs it, is
declared here) and the error handling of `run`; argument types (`lib.argtypes`), `UsageError`
(`lib.errors`) and the device and thread helpers (`lib.device`) are re-exported from here.

User mistakes (a wrong flag value, a missing or unusable file) raise `UsageError` (or
FileNotFoundError): `run` prints them as one `error: ...` line and exits with status 2. Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Callable, Optional

from lib.argtypes import image_size, int_at_least, int_in, number_in, positive_float  # noqa: F401 (re-exported)
from lib.device import cpu_threads, resolve_device  # noqa: F401 (re-exported for the scripts)
from lib.errors import UsageError  # noqa: F401 (re-exported: scripts and tests import it from here)
from lib.flags import (DATA_ROOT_HELP, add_backbone_weights_flag, add_batch_sequences_flag,  # noqa: F401 (re-exported)
                       add_compile_flag, add_data_root_flags, add_device_flag, add_fast_flag, add_mask_flag,
                       add_max_size_flag, add_num_aug_flag, add_random_backbone_flag, add_seed_flag, add_threads_flag,
                       add_threshold_flag, add_video_flag, threshold, threshold_list)
from lib.precision import PRECISIONS


# ---------------------------------------------------------------------------------------------
# Flags that need PyTorch (the precisions it runs)


def precision_list(text: str) -> list[str]:
    """argparse type: comma-separated precisions, e.g. fp32,bf16."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    wrong = [v for v in values if v not in PRECISIONS]
    if not values or wrong:
        raise argparse.ArgumentTypeError(f"must be {', '.join(PRECISIONS)} or a comma-separated list of them, "
                                         f"got {text!r}")
    return values


def add_precision_flag(parser, several: bool = False, default: str = "fp32") -> None:
    """--precision (evaluate.py, demo.py, train.py, the benchmarks): fp32, bf16 or fp16; with
    `several`, a comma-separated list compared side by side in one run (the first is the reference)."""
    what = "comma-separated precisions compared side by side, the first as the reference" if several else \
        "numeric precision"
    parser.add_argument("--precision", type=precision_list if several else str, choices=None if several else PRECISIONS,
                        default=precision_list(default) if several else default,
                        help=f"{what} (default {default}): fp32, bf16 or fp16. bf16/fp16 run the backbone and "
                             f"network under autocast, channels-last; the target models and the merge of object "
                             f"probabilities stay fp32. bf16 is fast on CPUs with AVX512-BF16/AMX and on GPUs "
                             f"with bf16; fp16 needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------
# Running a script


class Terminated(KeyboardInterrupt):
    """SIGTERM in a single process: unwinds like Ctrl-C (temporary files are removed)."""


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        kept: str = "") -> None:
    """Parse the command line and run main(args). A user mistake (UsageError, FileNotFoundError)
    or a stopped training (FloatingPointError: non-finite loss) becomes one `error: ...` line on
    stderr and exit status 2; Ctrl-C exits 130 and SIGTERM 143, each with one `error:` line that
    ends with `kept` (what is kept and how to continue); anything else keeps its traceback.
    Under torchrun (WORLD_SIZE > 1) see `_run_rank`: one line for the whole job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _run_rank(main, parser, kept)
    suffix = f" ({kept})" if kept else ""
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _in_main_thread() else None
    code = 0
    try:
        main(parser.parse_args())
    except (UsageError, FileNotFoundError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except Terminated:
        print(f"error: stopped by SIGTERM{suffix}", file=sys.stderr)
        code = 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"error: interrupted{suffix}", file=sys.stderr)
        code = 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code:
        sys.exit(code)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class _Rank:
    """How a torchrun worker leaves: `state` running -> reporting (claimed the error line, printing
    it) or waiting (silent, until the line is out) -> os._exit."""

    def __init__(self):
        from lib.distributed import ErrorLine

        self.line = ErrorLine()
        self.lock = threading.Lock()
        self.state = "running"
        self.code = 0

    def leave(self, code: int, message: Optional[str]) -> None:
        """Print `message` if this process is the job's reporter, else wait for the reporter's line;
        then end the process (os._exit, see _run_rank). Called by the main thread, or by the SIGTERM
        watcher, whichever comes first; the other one then does nothing."""
        with self.lock:
            other_leaving = self.state != "running"
            if not other_leaving:
                self.state, self.code = "reporting", code
        if other_leaving:
            threading.Event().wait()  # the other thread ends the process
        if message is not None and self.line.claim():
            sys.stdout.flush()
            sys.stderr.write(message)
            sys.stderr.flush()
            self.line.printed()
        elif code != 0:
            with self.lock:
                self.state = "waiting"
            self.line.wait_printed()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def on_sigterm(self, text: str) -> None:
        """torchrun stops the workers with SIGTERM when one of them ended (or it was stopped itself):
        the first to claim the line says so; a process already printing finishes."""
        with self.lock:
            state = self.state
        if state == "reporting":
            return
        if state == "waiting":
            os._exit(self.code)
        self.leave(128 + signal.SIGTERM, text)


def _watch_sigterm(rank: _Rank, text: str) -> None:
    """Handle SIGTERM in a thread of its own: the main thread may be blocked in a collective or a
    long kernel, where a Python signal handler would not run until torchrun's SIGKILL. Python's
    C-level handler writes the signal number to the wakeup socket, which this thread reads."""
    receive, send = socket.socketpair()
    send.setblocking(False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        _ = send  # the wakeup socket lives as long as this thread
        while True:
            data = receive.recv(64)
            if not data:
                return
            if signal.SIGTERM in data:
                rank.on_sigterm(text)

    threading.Thread(target=watch, name="sigterm-watcher", daemon=True).start()


def _run_rank(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser, kept: str) -> None:
    """run() for one torchrun worker. Exactly one `error:` line (or traceback) for the whole job,
    however torchrun tears the processes down: each failing process claims the line (lib.
    distributed.ErrorLine), the first prints it, the others stay silent and wait until it is out;
    a process stopped by SIGTERM does the same, so one that is stopped because another died says
    so. Every process leaves with os._exit: at interpreter teardown gloo's transport threads can be
    destroyed while joinable, which aborts the process (SIGABRT, "terminate called without an
    active exception"; about 1 in 10 two-process CPU evaluations here). By then every result is on
    disk: sequences and checkpoints are written atomically."""
    from lib.distributed import peer_lost

    world, rank_id = os.environ.get("WORLD_SIZE"), os.environ.get("RANK", "0")
    suffix = f" ({kept})" if kept else ""
    rank = _Rank()
    if _in_main_thread():
        # On a line of its own: SIGTERM can come while rank 0's progress bar is mid-line.
        _watch_sigterm(rank, f"\nerror: stopped by SIGTERM on rank {rank_id} of {world}: torchrun stops every "
                             f"process when one fails or dies (see its report){suffix}\n")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # argparse's usage and error: printed once below
            args = parser.parse_args()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        rank.leave(code, captured.getvalue() if code else None)
    sys.stderr.write(captured.getvalue())
    code, message = 0, None
    try:
        main(args)
    except (UsageError, FileNotFoundError, FloatingPointError) as exc:
        code, message = 2, f"error: {exc}\n"
    except ConnectionError as exc:  # another process of the job died (lib.distributed.all_gather)
        code, message = 1, f"error: {exc}{suffix}\n"
    except RuntimeError as exc:
        if peer_lost(exc):  # e.g. DDP's gradient all-reduce in training, when another process died
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            code, message = 1, (f"error: rank {rank_id} of {world}: a collective with the other processes failed, "
                                f"probably because one of them died (see torchrun's report): {first}{suffix}\n")
        else:  # a bug: its traceback, once
            code, message = 1, traceback.format_exc()
    except KeyboardInterrupt:
        code, message = 130, f"error: interrupted{suffix}\n"
    except SystemExit as exc:  # a process that leaves the report to another (silent)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a bug: its traceback, once
        code, message = 1, traceback.format_exc()
    rank.leave(code, message)

