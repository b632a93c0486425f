"""A rank's sequences tracked to disk (evaluate.py's tracking step): one at a time (`Tracker.track`)
or `--batch-sequences` at a time in lockstep (`Tracker.track_many`). Both yield (sequence name,
statistics) as each sequence's folder lands, and raise `SequenceFailure` naming the sequence
whose tracking failed; `lib.evaluation.track_sequences` keeps the books. Both have a thread
augment the next sequence's first frame while the current one tracks."""
from __future__ import annotations

import math
import sys
import threading
import time
from contextlib import ExitStack, closing
from functools import partial
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from tqdm import tqdm

from lib.background import BackgroundWriter, read_ahead
from lib.errors import UsageError
from lib.results import SequenceWriter, TrackingStats

if TYPE_CHECKING:
    from lib.evaluation import Job

PREFETCH_FRAMES = 4  # frames decoded ahead of the tracker
PENDING_WRITES = 8  # PNGs queued for the writer thread


class WriteError(UsageError):
    """A result file could not be written (disk full, permissions): names the path."""


class SequenceFailure(Exception):
    """Tracking `sequence` failed with `error` (the original exception)."""

    def __init__(self, sequence: str, error: BaseException):
        super().__init__(sequence, error)
        self.sequence, self.error = sequence, error


def _as_write_error(exc: BaseException, job: "Job") -> BaseException:
    """A disk error while writing results -> WriteError saying what to fix; other errors as they are."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return WriteError(f"{exc} (free space or fix the permissions of {job.out_dir})")
    return exc


class SequenceOutput:
    """One sequence's results as they are tracked: PNGs by a background writer into the
    sequence's temporary folder, statistics; `finish` flushes and checks the PNGs, writes the
    timeline and moves the folder into place. A context manager (an error discards the folder)."""

    def __init__(self, job: "Job", seq):
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

    def add(self, frame) -> None:
        """The next frame's FrameResult: its PNG queued, its statistics counted."""
        name = self.seq.frame_names[self.stats.frames]
        self.pngs.submit(self.writer.tmp_dir / f"{name}.png", partial(self.writer.write, name, frame.labels.numpy()))
        self.stats.add(frame, name)

    @property
    def complete(self) -> bool:
        return self.stats.frames == len(self.seq)

    def finish(self) -> dict:
        """Flush the PNGs, write timeline.json and the statistics -> the statistics."""
        job, stats = self.job, self.stats
        self.pngs.flush()
        wall = time.perf_counter() - self.started
        self.writer.write_json("timeline.json", {"fps": stats.fps, "frames": stats.timeline})
        result = {**stats.as_dict(), "wall_seconds": wall,
                  "wall_fps": stats.frames / wall if wall > 0 else math.nan, "settings": job.settings,
                  "device": str(job.device), "torch_version": torch.__version__, "rank": job.ctx.rank}
        self.writer.finish(result)
        return result


def _progress(job: "Job", total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, dynamic_ncols=True, disable=not job.ctx.is_main)


def percent(value) -> str:
    """A rate as a percentage for reports, "n/a" when unknown."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def prepare_first_frame(tracker, frames) -> None:
    """Augment the objects starting on the first of `frames` (a sequence or a list of frames as
    `Tracker.track` takes them) ahead of tracking (`FirstFrameAugmenter.prepare`): the tracker's
    start of those objects then takes the result instead of computing it, the same images.
    For a background thread; does nothing without an augmenter. A frame that cannot be read or
    augmented is left for the tracker to report, in its place."""
    augmenter = tracker.augmenter
    if augmenter is None or len(frames) == 0:
        return
    try:
        image, labels, new_ids = frames[0]
        if isinstance(image, np.ndarray):  # (H, W, 3), as Tracker.track also takes it
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        labels = torch.as_tensor(labels)
        for obj_id in new_ids or []:  # each object from the same seed, as the tracker does
            augmenter.prepare(image, (labels == obj_id)[None], np.random.default_rng(tracker.seed))
    except Exception:  # noqa: BLE001 (reported by the tracker, which reads the frame again)
        return


def _preparing_next(tracker, sequences: list, frames: dict) -> Iterator:
    """The sequences, each handed out while a thread augments the objects starting on the next
    one's first frame (`prepare_first_frame`); that thread is joined before the next is handed out."""
    ahead = None
    try:
        for i, seq in enumerate(sequences):
            if ahead is not None:
                ahead.join()  # it had the previous sequence's time
            ahead = None
            if i + 1 < len(sequences):
                upcoming = sequences[i + 1]
                ahead = threading.Thread(target=prepare_first_frame, name="prepare-augmentation", daemon=True,
                                         args=(tracker, frames.get(upcoming.name, upcoming)))
                ahead.start()
            yield seq
    finally:
        if ahead is not None:
            ahead.join()


def track_one_by_one(job: "Job", tracker, sequences: list, frames: dict) -> Iterator[tuple[str, dict]]:
    """Track the sequences one after another, each sequence's frames decoded ahead in a thread
    (or taken from `frames`, {name: its frames in memory}) -> (name, statistics) per sequence."""
    for seq in _preparing_next(tracker, sequences, frames):
        try:
            with SequenceOutput(job, seq) as output, _progress(job, len(seq), seq.name) as bar, \
                    closing(read_ahead(frames.get(seq.name, seq), PREFETCH_FRAMES)) as reader:
                for frame in tracker.track(reader, job.config.TH, keep_probabilities=False):
                    output.add(frame)
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


def track_lockstep(job: "Job", tracker, sequences: list, frames: dict) -> Iterator[tuple[str, dict]]:
    """Track the sequences job.config.batch_sequences at a time in lockstep, longest first, frames
    decoded ahead in a thread per open sequence (or taken from `frames`) -> (name, statistics) as
    each sequence finishes. A failure discards the open sequences' folders."""
    outputs: dict[str, SequenceOutput] = {}  # open sequences
    readers, failed = [], []
    # Longest first: a freed slot takes the longest sequence left, so the last steps, with fewer
    # sequences in flight, are few.
    sequences = sorted(sequences, key=len, reverse=True)

    def source():
        for seq in _preparing_next(tracker, sequences, frames):
            reader = read_ahead(frames.get(seq.name, seq), PREFETCH_FRAMES)
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
