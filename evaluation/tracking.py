"""A rank's sequences tracked to disk (evaluate.py's tracking step) and the one per-sequence
tracking loop (`track_sequence`: one at a time here, the sweep's timing runs, demo.py's video).

`track_sequences` tracks a rank's share one at a time (`Tracker.track`) or `--batch-sequences` at
a time in lockstep (`Tracker.track_many`), each sequence's frames counted and written by a
`SequenceOutput`; a thread decodes the next sequence's first frame and augments its starting
objects while the current one tracks (the reader then starts from that decoded frame).
`exchange_outcomes` gathers the ranks' outcomes.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import ExitStack, closing
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from evaluation.job import Job, job_tracker
from evaluation.results import SequenceWriter, TrackingStats, percent, rate, write_timeline
from lib import distributed
from lib.background import BackgroundWriter, read_ahead
from lib.errors import UsageError
from lib.fileio import make_dirs
from lib.image_io import host_image

PREFETCH_FRAMES = 4  # frames decoded ahead of the tracker
PENDING_WRITES = 8  # PNGs queued for the writer thread


class WriteError(UsageError):
    """A result file could not be written (disk full, permissions): names the path."""


class SequenceFailure(Exception):
    """Tracking `sequence` failed with `error` (the original exception)."""

    def __init__(self, sequence: str, error: BaseException):
        super().__init__(sequence, error)
        self.sequence, self.error = sequence, error


def _as_write_error(exc: BaseException, job: Job) -> BaseException:
    """A disk error while writing results -> WriteError saying what to fix; other errors as they are."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return WriteError(f"{exc} (free space or fix the permissions of {job.out_dir})")
    return exc


class SequenceOutput:
    """One sequence's results as they are tracked: PNGs by a background writer into the
    sequence's temporary folder, statistics; `finish` flushes and checks the PNGs, writes the
    timeline and moves the folder into place. A context manager (an error discards the folder)."""

    def __init__(self, job: Job, seq):
        self.job, self.seq = job, seq
        self.stats = TrackingStats()
        self.started = time.perf_counter()
        self._stack = ExitStack()
        self.writer = self._stack.enter_context(SequenceWriter(job.out_dir, seq.name, seq.frame_names))
        self.pngs = self._stack.enter_context(BackgroundWriter(PENDING_WRITES))

    def __enter__(self) -> "SequenceOutput":
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def write(self, frame) -> None:
        """The PNG of the frame last counted in `stats` (a FrameResult) queued."""
        name = self.seq.frame_names[self.stats.frames - 1]
        self.pngs.submit(self.writer.tmp_dir / f"{name}.png", partial(self.writer.write, name, np.asarray(frame.labels)))

    def add(self, frame) -> None:
        """The next frame's FrameResult: its statistics counted, its PNG queued."""
        self.stats.add(frame, self.seq.frame_names[self.stats.frames])
        self.write(frame)

    @property
    def complete(self) -> bool:
        return self.stats.frames == len(self.seq)

    def finish(self) -> dict:
        """Flush the PNGs, write timeline.json and the statistics -> the statistics."""
        job, stats = self.job, self.stats
        self.pngs.flush()
        wall = time.perf_counter() - self.started
        write_timeline(self.writer.tmp_dir / "timeline.json", stats.fps, stats.timeline)
        result = {**stats.as_dict(), "wall_seconds": wall, "wall_fps": rate(stats.frames, wall),
                  "settings": job.settings, "device": str(job.device), "torch_version": torch.__version__,
                  "rank": job.ctx.rank}
        self.writer.finish(result)
        return result


def _progress(job: Job, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, dynamic_ncols=True, disable=not job.ctx.is_main)


def prepare_first_frame(tracker, frames) -> Optional[tuple]:
    """Decode the first of `frames` (a sequence or a list of frames as `Tracker.track` takes
    them) and augment the objects starting on it ahead of tracking (`HostAugmenter.prepare_host`):
    the tracker's start of those objects then takes the result instead of computing it, the same
    images. For a background thread. -> the decoded frame, for the reader to start from (None
    without an augmenter, or when the frame cannot be read or augmented: the reader reads it
    again and the tracker reports the error in its place)."""
    augmenter = tracker.augmenter  # a lib.augmentation.HostAugmenter (models.Tracker's, deploy's) or None
    if augmenter is None or len(frames) == 0:
        return None
    try:
        first = frames[0]
        image, labels, new_ids = first
        image, labels = host_image(image), np.asarray(labels)
        for obj_id in new_ids or []:  # each object from the same seed, as the tracker does
            augmenter.prepare_host(image, labels == obj_id, np.random.default_rng(tracker.seed))
    except Exception:  # noqa: BLE001 (reported by the tracker, which reads the frame again)
        return None
    return first


class _Ahead(threading.Thread):
    """`prepare_first_frame` of one sequence in a thread; `first` its decoded first frame."""

    def __init__(self, tracker, frames):
        super().__init__(name="prepare-augmentation", daemon=True)
        self.tracker, self.frames, self.first = tracker, frames, None

    def run(self) -> None:
        self.first = prepare_first_frame(self.tracker, self.frames)


def _frames_from(frames, first: Optional[tuple]) -> Iterable:
    """`frames` (a sequence, or frames in memory), its first frame taken from `first` when the
    thread decoded it (a sequence is read from its second frame on)."""
    if first is None or isinstance(frames, list):
        return frames
    return _first_then_rest(frames, first)


def _first_then_rest(frames, first: tuple) -> Iterator:
    yield first
    for i in range(1, len(frames)):
        yield frames[i]


def _preparing_next(tracker, sequences: list, frames: dict) -> Iterator[tuple]:
    """(sequence, its frames) for each sequence, handed out while a thread decodes the next
    one's first frame and augments the objects starting on it (`prepare_first_frame`); that
    thread is joined before the next is handed out."""
    ahead: Optional[_Ahead] = None
    try:
        for i, seq in enumerate(sequences):
            first = None
            if ahead is not None:
                ahead.join()  # it had the previous sequence's time
                first = ahead.first
            ahead = None
            if i + 1 < len(sequences):
                upcoming = sequences[i + 1]
                ahead = _Ahead(tracker, frames.get(upcoming.name, upcoming))
                ahead.start()
            yield seq, _frames_from(frames.get(seq.name, seq), first)
    finally:
        if ahead is not None:
            ahead.join()


def track_sequence(tracker, frames: Iterable, threshold: float, stats: TrackingStats,
                   name_of: Optional[Callable[[int], str]] = None) -> Iterator:
    """The per-sequence tracking loop: `tracker.track` over `frames` (no probabilities kept),
    each frame's result counted in `stats` (its timeline entry named `name_of(frame index)`)
    and then yielded."""
    for frame in tracker.track(frames, threshold, keep_probabilities=False):
        stats.add(frame, name_of(stats.frames) if name_of is not None else "")
        yield frame


def track_one_by_one(job: Job, tracker, sequences: list, frames: dict) -> Iterator[tuple[str, dict]]:
    """Track the sequences one after another, each sequence's frames decoded ahead in a thread
    (or taken from `frames`, {name: its frames in memory}) -> (name, statistics) per sequence."""
    for seq, source in _preparing_next(tracker, sequences, frames):
        try:
            with SequenceOutput(job, seq) as output, _progress(job, len(seq), seq.name) as bar, \
                    closing(read_ahead(source, PREFETCH_FRAMES)) as reader:
                for frame in track_sequence(tracker, reader, job.config.TH, output.stats, seq.frame_names.__getitem__):
                    output.write(frame)
                    bar.update(1)
                    bar.set_postfix(fps=f"{output.stats.fps:.1f}", reuse=percent(output.stats.reuse_rate),
                                    refresh=False)
                stats = output.finish()
        except Exception as exc:
            raise SequenceFailure(seq.name, _as_write_error(exc, job)) from exc
        yield seq.name, stats


def _tagged(name: str, frames, failed: list[str]) -> Iterator:
    """`frames`, noting `name` in `failed` when reading them raises (track_many cannot say whose)."""
    try:
        yield from frames
    except Exception:
        failed.append(name)
        raise


def track_lockstep(job: Job, tracker, sequences: list, frames: dict) -> Iterator[tuple[str, dict]]:
    """Track the sequences job.config.batch_sequences at a time in lockstep, longest first, frames
    decoded ahead in a thread per open sequence (or taken from `frames`) -> (name, statistics) as
    each sequence finishes. A failure discards the open sequences' folders."""
    outputs: dict[str, SequenceOutput] = {}  # open sequences
    readers, failed = [], []
    # Longest first: a freed slot takes the longest sequence left, so the last steps, with fewer
    # sequences in flight, are few.
    sequences = sorted(sequences, key=len, reverse=True)

    def source():
        for seq, frames_of_seq in _preparing_next(tracker, sequences, frames):
            reader = read_ahead(frames_of_seq, PREFETCH_FRAMES)
            readers.append(reader)
            outputs[seq.name] = SequenceOutput(job, seq)
            yield seq.name, _tagged(seq.name, reader, failed)

    name = sequences[0].name if sequences else ""
    try:
        with _progress(job, sum(len(seq) for seq in sequences), f"{len(sequences)} sequences") as bar:
            for name, frame in tracker.track_many(source(), job.config.TH, batch=job.config.batch_sequences,
                                                  keep_probabilities=False):
                output = outputs[name]
                output.add(frame)
                bar.update(1)
                if output.complete:
                    with outputs.pop(name) as output:
                        stats = output.finish()
                    yield name, stats
    except Exception as exc:
        for output in outputs.values():  # unfinished: their folders are discarded
            output.__exit__(type(exc), exc, exc.__traceback__)
        raise SequenceFailure(failed[0] if failed else name, _as_write_error(exc, job)) from exc
    finally:
        for reader in readers:
            reader.close()


def track_sequences(job: Job, sequences: list, tracker=None, frames: Optional[dict] = None) -> dict:
    """Track this rank's sequences, stopping at the first failure (with `tracker`, else a new
    one; `frames`: {sequence name: its frames in memory} for those not to be read from disk).
    Returns this rank's outcome: {"rank", "sequences", "frames", "tracker_seconds",
    "wall_seconds", "failure"} with failure None or {"sequence", "error"}; `error` (the
    exception) is kept for the caller."""
    outcome = {"rank": job.ctx.rank, "sequences": [], "frames": 0, "tracker_seconds": 0.0, "wall_seconds": 0.0,
               "failure": None}
    if not sequences:
        return outcome
    tracker = job_tracker(job) if tracker is None else tracker
    frames = frames or {}
    if job.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as upstream
        # Untimed warm-up (CUDA context, cuDNN autotuning), like upstream's speedrun.
        first = sequences[0]
        for _ in tracker.track((first[i] for i in range(min(2, len(first)))), job.config.TH, keep_probabilities=False):
            pass
    make_dirs(job.out_dir, "the results folder", "--output-root or $RVOS_OUTPUT")
    started = time.perf_counter()
    track = track_lockstep if job.config.batch_sequences > 1 else track_one_by_one
    try:
        for name, stats in track(job, tracker, sequences, frames):
            outcome["sequences"].append(name)
            outcome["frames"] += stats["frames"]
            outcome["tracker_seconds"] += stats["seconds"]
    except SequenceFailure as failure:
        outcome["failure"] = {"sequence": failure.sequence,
                              "error": _with_context(str(failure.error), failure.sequence, job.out_dir)}
        outcome["exception"] = failure.error
    outcome["wall_seconds"] = time.perf_counter() - started
    return outcome


def _with_context(message: str, sequence: str, out_dir: Path) -> str:
    return (f"{message} (while tracking sequence {sequence!r}; finished sequences are kept in {out_dir}; "
            f"continue with --resume)")


USER_ERRORS = (UsageError, FileNotFoundError)


def exchange_outcomes(job: Job, outcome: dict) -> list[dict]:
    """Gather every rank's outcome (a barrier). When a rank failed: in one process the original
    error with the sequence named; over several ranks each failed rank raises UsageError naming
    the first failed rank and its sequence (the same text on each; lib.cli.run prints it once)
    or re-raises a non-input error (for its traceback), and the other ranks exit with status 2
    silently."""
    exception = outcome.pop("exception", None)
    if not job.ctx.distributed:
        if exception is not None:
            message = outcome["failure"]["error"]
            if isinstance(exception, USER_ERRORS):
                error_type = FileNotFoundError if isinstance(exception, FileNotFoundError) else UsageError
                raise error_type(message) from exception
            raise exception
        return [outcome]
    outcomes = distributed.all_gather(job.ctx, outcome)
    message = distributed.first_failure(outcomes, job.ctx.world_size)
    if message is None:
        return outcomes
    if exception is None:
        raise SystemExit(2)  # a rank that failed says so (lib.cli.run prints one line for the job)
    if not isinstance(exception, USER_ERRORS):
        raise exception
    raise UsageError(message) from exception
