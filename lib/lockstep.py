"""evaluate.py --batch-sequences B: this rank's sequences tracked B at a time in lockstep
(`Tracker.track_many`), each written as `lib.evaluation.track_sequence` writes it."""
from __future__ import annotations

import sys
from typing import Iterator

from tqdm import tqdm

from lib.background import read_ahead


def _tagged(name: str, frames, failed: list[str]) -> Iterator:
    """`frames`, noting `name` in `failed` when reading them raises (track_many cannot say whose)."""
    try:
        yield from frames
    except Exception:
        failed.append(name)
        raise


def track_lockstep(job, tracker, sequences: list, frames: dict, outcome: dict) -> None:
    """Track `sequences` job.config.batch_sequences at a time, frames decoded ahead in a thread per
    open sequence (or taken from `frames`, {name: frames in memory}); fills `outcome` as
    `lib.evaluation.track_sequences` does, stopping at the first failure."""
    from lib.evaluation import PREFETCH_FRAMES, SequenceOutput, WriteError, _with_context

    lengths = {seq.name: len(seq) for seq in sequences}
    outputs: dict[str, SequenceOutput] = {}  # open sequences
    readers, failed = [], []

    def source():
        for seq in sequences:
            reader = read_ahead(frames.get(seq.name, seq), PREFETCH_FRAMES)
            readers.append(reader)
            outputs[seq.name] = SequenceOutput(job, seq)
            yield seq.name, _tagged(seq.name, reader, failed)

    name = sequences[0].name
    try:
        with tqdm(total=sum(lengths.values()), desc=f"{len(sequences)} sequences", unit="frame", file=sys.stderr,
                  dynamic_ncols=True, disable=not job.ctx.is_main) as bar:
            for name, frame in tracker.track_many(source(), job.config.TH, batch=job.config.batch_sequences,
                                                  keep_probabilities=False):
                output = outputs[name]
                output.add(output.stats.frames, frame)
                bar.update(1)
                if output.stats.frames == lengths[name]:
                    with outputs.pop(name) as output:
                        stats = output.finish()
                    outcome["sequences"].append(name)
                    outcome["frames"] += stats["frames"]
                    outcome["tracker_seconds"] += stats["seconds"]
    except Exception as exc:
        name = failed[0] if failed else name
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            exc = WriteError(f"{exc} (free space or fix the permissions of {job.out_dir})")
        outcome["failure"] = {"sequence": name, "error": _with_context(str(exc), name, job.out_dir)}
        outcome["exception"] = exc
        for output in outputs.values():  # unfinished: their folders are discarded
            output.__exit__(type(exc), exc, exc.__traceback__)
    finally:
        for reader in readers:
            reader.close()
