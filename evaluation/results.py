"""Evaluation results on disk: where they go, how they are written, what they score.

Layout (docs/evaluation.md):

    <output root>/result/<dset>-<model stem>_<TH>[_fast]/        the results directory
        <sequence>/<frame>.png                                    DAVIS-palette label PNGs
        <sequence>/.tracking.json                                 tracking statistics of the sequence
        <sequence>/timeline.json                                  per-frame reuse decisions (visualize.py)
        results.json, results.csv                                 metrics, FPS, reuse rate
    <output root>/result/<dset>-<model stem>_<TH>[_fast].zip      YouTube-VOS submission (valid splits)

A sequence is written into a hidden temporary directory next to its final place and renamed
into place only when every frame is written, together with its `.tracking.json`; so a sequence
directory that exists is complete, and an interrupted run leaves earlier sequences (and an older
complete copy of the interrupted one) untouched.

Metrics are computed from the PNGs on disk, so they are exactly what an offline evaluation of
the written results gives.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence as SequenceType

import numpy as np

from lib.background import BackgroundWriter
from lib.errors import UsageError
from lib.fileio import atomic_write_bytes, make_dirs, make_temp_dir
from lib.image_io import read_label_png, write_label_png
from lib.metrics import (LVOS_STEP, evaluate_lvos_object, evaluate_lvos_sequence, evaluate_results, json_safe,
                         lvos_scored_positions, summarize_lvos)

RESULT_SUBDIR = "result"
STATS_FILE = ".tracking.json"  # per-sequence tracking statistics, inside the sequence directory
_PARTIAL = ".partial"


# ---------------------------------------------------------------------------------------------
# Naming


def format_threshold(threshold: float) -> str:
    """The reuse threshold as it appears in directory names: Python's str of the float
    ("0.7", "1.0"), as upstream (which formatted the --tau value)."""
    return str(float(threshold))


def model_stem(model: str | os.PathLike) -> str:
    """A checkpoint's file stem (gfrtm_rn18.pth -> gfrtm_rn18); an exported folder's name with
    "-onnx" (exported/gfrtm_rn18 -> gfrtm_rn18-onnx), apart from its checkpoint's results."""
    path = Path(model)
    return f"{path.name}-onnx" if path.is_dir() else path.stem


def results_dir_name(dset: str, model: str | os.PathLike, threshold: float, fast: bool) -> str:
    """`<dset>-<model stem>_<TH>[_fast]`, e.g. dv2017val-gfrtm_rn18_0.7_fast (`model_stem`)."""
    return f"{dset}-{model_stem(model)}_{format_threshold(threshold)}{'_fast' if fast else ''}"


def curve_dir_name(dset: str, model: str | os.PathLike, fast: bool) -> str:
    """`<dset>-<model stem>_curve[_fast]`: a threshold sweep's curve, beside its results directories."""
    return f"{dset}-{model_stem(model)}_curve{'_fast' if fast else ''}"


def results_dir(output_root: str | os.PathLike, dset: str, model: str | os.PathLike, threshold: float,
                fast: bool) -> Path:
    """`<output root>/result/<dset>-<model stem>_<TH>[_fast]`."""
    return Path(output_root).expanduser() / RESULT_SUBDIR / results_dir_name(dset, model, threshold, fast)


def submission_zip_path(results_directory: str | os.PathLike) -> Path:
    """`<results dir>.zip`, next to the results directory."""
    results_directory = Path(results_directory)
    return results_directory.with_name(results_directory.name + ".zip")


# ---------------------------------------------------------------------------------------------
# Writing one sequence


class SequenceWriter:
    """Writes one sequence's label PNGs into a temporary directory and renames it into place.

        with SequenceWriter(results_dir, "car-shadow", frame_names) as writer:
            for name, labels in ...:
                writer.write(name, labels)
            writer.finish({"frames": ..., ...})

    finish() checks that every frame was written, adds the statistics file and replaces the
    sequence directory (an older complete copy is removed only after the new one is in place).
    Leaving the block without finish() (an exception) deletes the temporary directory and
    leaves any older copy as it was. Temporary directories left by killed runs of the same
    sequence are removed when the sequence is written again.

    With a `background` writer the PNGs are encoded and written in its thread; flush() and
    finish() wait for them and raise the first write error (naming the path), so a sequence
    counts as finished only when every file is on disk.
    """

    def __init__(self, results_directory: str | os.PathLike, name: str, frame_names: SequenceType[str],
                 background: Optional[BackgroundWriter] = None):
        self.background = background
        self.results_dir = Path(results_directory)
        self.name = name
        self.frame_names = list(frame_names)
        self.final_dir = self.results_dir / name
        self.tmp_dir: Optional[Path] = None
        self._written: set[str] = set()
        self._finished = False

    def __enter__(self) -> "SequenceWriter":
        make_dirs(self.results_dir, "the results folder")
        own = re.compile(rf"\.{re.escape(self.name)}\.(old\.)?[^.]+{re.escape(_PARTIAL)}")
        for stale in self.results_dir.glob(f".{self.name}.*{_PARTIAL}"):
            if own.fullmatch(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp_dir = make_temp_dir(self.results_dir, f".{self.name}.", _PARTIAL)
        return self

    def write(self, frame_name: str, labels) -> Path:
        """Write one frame's labels (uint8 H x W object ids) as <frame>.png."""
        if self.tmp_dir is None:
            raise RuntimeError("SequenceWriter.write outside its with-block")
        path = self.tmp_dir / f"{frame_name}.png"
        labels = np.asarray(labels, dtype=np.uint8)
        if self.background is None:
            write_label_png(path, labels)
        else:
            self.background.submit(path, lambda: write_label_png(path, labels))
        self._written.add(frame_name)
        return path

    def flush(self) -> None:
        """Wait until every PNG written so far is on disk (raises the first write error)."""
        if self.background is not None:
            self.background.flush()

    def write_json(self, file_name: str, data) -> Path:
        """Write a JSON file (e.g. timeline.json) into the sequence directory."""
        if self.tmp_dir is None:
            raise RuntimeError("SequenceWriter.write_json outside its with-block")
        path = self.tmp_dir / file_name
        atomic_write_bytes(path, _json_bytes(data))
        return path

    def finish(self, stats: Optional[Mapping] = None) -> Path:
        """Check completeness, write the statistics, move the directory into place."""
        if self.tmp_dir is None:
            raise RuntimeError("SequenceWriter.finish outside its with-block")
        self.flush()
        missing = [f for f in self.frame_names if f not in self._written]
        if missing:
            raise RuntimeError(f"sequence {self.name!r}: {len(missing)} frame(s) not written, e.g. "
                               f"{missing[0]!r}")
        atomic_write_bytes(self.tmp_dir / STATS_FILE, _json_bytes(dict(stats or {})))
        old = None
        if self.final_dir.exists():
            old = make_temp_dir(self.results_dir, f".{self.name}.old.", _PARTIAL)
            os.replace(self.final_dir, old / self.name)
        os.replace(self.tmp_dir, self.final_dir)
        self.tmp_dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._finished = True
        return self.final_dir

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.tmp_dir is not None:
            if self.background is not None:  # nothing may still be writing into the directory
                try:
                    self.background.flush()
                except Exception:  # the error that brought us here is the one to report
                    pass
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None
        return False


def sequence_complete(results_directory: str | os.PathLike, name: str,
                      frame_names: Optional[SequenceType[str]] = None) -> bool:
    """Whether `name` was written completely by SequenceWriter (statistics file present and,
    when frame_names are given, a PNG for each frame)."""
    seq_dir = Path(results_directory) / name
    if not (seq_dir / STATS_FILE).is_file():
        return False
    return all((seq_dir / f"{f}.png").is_file() for f in (frame_names or []))


def read_sequence_stats(results_directory: str | os.PathLike, name: str) -> dict:
    """The statistics a completed sequence was written with."""
    path = Path(results_directory) / name / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tracking statistics not found: {path} (sequence {name!r} was not "
                                f"completed; run it again with --sequences {name})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"cannot parse {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Tracking statistics: FPS and reuse rate


def timeline_entry(frame_name: str, reused_by_id: Mapping, reuse_prob_by_id: Mapping) -> dict:
    """One frame of timeline.json: {"frame": name, "reused": {"id": bool}, "reuse_prob": {"id":
    float}} (ids in order; "reuse_prob" holds the objects whose gate ran, rounded to 1e-6)."""
    def ordered(by_id: Mapping) -> list:
        return sorted(by_id.items(), key=lambda kv: int(kv[0]))
    return {"frame": str(frame_name), "reused": {str(k): bool(v) for k, v in ordered(reused_by_id)},
            "reuse_prob": {str(k): round(float(v), 6) for k, v in ordered(reuse_prob_by_id)}}


def write_timeline(path: str | os.PathLike, fps: float, frames: Iterable[Mapping]) -> Path:
    """Write timeline.json, the one writer of it: {"fps": fps (null when unknown), "frames":
    [{"frame": stem, "reused": {"id": bool}, "reuse_prob": {"id": float}}]} ("reuse_prob"
    optional in `frames`)."""
    data = {"fps": float(fps) if math.isfinite(fps) else None,
            "frames": [timeline_entry(f["frame"], f["reused"], f.get("reuse_prob", {})) for f in frames]}
    path = Path(path)
    atomic_write_bytes(path, _json_bytes(data))
    return path


def load_timeline(path: str | os.PathLike) -> dict:
    """Read and check a timeline.json. Raises FileNotFoundError / UsageError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"timeline not found: {path}")
    try:
        data = json.loads(path.read_text())
        frames = data["frames"]
        for f in frames:
            str(f["frame"])
            {int(k): bool(v) for k, v in f["reused"].items()}
            {int(k): float(v) for k, v in f.get("reuse_prob", {}).items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{path} is not a timeline.json ({{'fps': ..., 'frames': [{{'frame': ..., "
                         f"'reused': {{...}}}}]}}): {exc!r}") from exc
    return data


class TrackingStats:
    """Accumulates tracker time and reuse decisions over one sequence.

    FPS = frames / tracker time (object initialization included; disk reading and PNG writing
    excluded; CUDA synchronized per frame). Reuse rate = reused object-frames / tracked
    object-frames, an object being tracked in every frame after its first.
    """

    def __init__(self) -> None:
        self.frames = 0
        self.seconds = 0.0
        self.wall_seconds: Optional[float] = None  # reading, tracking and writing, set by the caller
        self.objects: dict[int, dict[str, int]] = {}
        self.timeline: list[dict] = []  # per frame: {"frame": name, "reused": {"id": bool}, "reuse_prob": {"id": p}}

    @classmethod
    def from_timeline(cls, frames: Iterable[Mapping]) -> "TrackingStats":
        """The statistics of a timeline ({"frame", "reused": {id: bool}} per frame, as in
        timeline.json), without tracker time."""
        stats = cls()
        for f in frames:
            stats._record(str(f["frame"]), f["reused"], f.get("reuse_prob", {}))
        return stats

    def add(self, frame_result, frame_name: str = "") -> None:
        """Count one tracker result (models.FrameResult: `seconds`, `reused` {id: bool},
        `reuse_prob` {id: float} where the gate ran)."""
        self.seconds += float(frame_result.seconds)
        self._record(frame_name, frame_result.reused, frame_result.reuse_prob)

    def _record(self, frame_name: str, reused_by_id: Mapping, reuse_prob_by_id: Mapping) -> None:
        self.frames += 1
        self.timeline.append(timeline_entry(frame_name, reused_by_id, reuse_prob_by_id))
        for obj_id, reused in reused_by_id.items():
            entry = self.objects.setdefault(int(obj_id), {"tracked": 0, "reused": 0})
            entry["tracked"] += 1
            entry["reused"] += int(bool(reused))

    @property
    def tracked(self) -> int:
        return sum(o["tracked"] for o in self.objects.values())

    @property
    def reused(self) -> int:
        return sum(o["reused"] for o in self.objects.values())

    @property
    def fps(self) -> float:
        return rate(self.frames, self.seconds)

    @property
    def reuse_rate(self) -> float:
        return self.reused / self.tracked if self.tracked else math.nan

    @property
    def wall_fps(self) -> float:
        return rate(self.frames, self.wall_seconds)

    def as_dict(self) -> dict:
        return {"frames": self.frames, "seconds": self.seconds, "fps": self.fps,
                "wall_seconds": self.wall_seconds, "wall_fps": self.wall_fps,
                "tracked_object_frames": self.tracked, "reused_object_frames": self.reused,
                "reuse_rate": self.reuse_rate,
                "reuse_per_object": {str(k): dict(v) for k, v in sorted(self.objects.items())}}


def rate(count: float, seconds: float | None) -> float:
    """The one definition of a speed: `count` (frames) / `seconds`, NaN without time."""
    return count / seconds if seconds is not None and seconds > 0 else math.nan


def percent(value, sign: bool = True) -> str:
    """A rate (0..1) as a percentage with one decimal for reports and tables ("12.3%", or "12.3"
    without `sign` where the header says %), "n/a" when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}{'%' if sign else ''}"


def summarize_tracking(per_sequence: Mapping[str, Mapping], wall_seconds: float, frames_run: int) -> dict:
    """Overall numbers from per-sequence statistics (TrackingStats.as_dict()), pooled over all
    sequences of all ranks: fps = all frames / all tracker time, reuse_rate = all reused / all
    tracked object-frames; wall_fps = the frames tracked in this run (`frames_run`) / the run's
    wall time (`wall_seconds`: the longest rank's tracking loop); plus upstream's averages (mean
    of the sequences' fps; mean of the objects' reuse rates) for comparison with upstream's
    printout."""
    frames = sum(int(s["frames"]) for s in per_sequence.values())
    seconds = sum(float(s["seconds"]) for s in per_sequence.values())
    tracked = sum(int(s["tracked_object_frames"]) for s in per_sequence.values())
    reused = sum(int(s["reused_object_frames"]) for s in per_sequence.values())
    seq_fps = [s["fps"] for s in per_sequence.values() if _finite(s.get("fps"))]
    obj_rates = [o["reused"] / o["tracked"] for s in per_sequence.values()
                 for o in s.get("reuse_per_object", {}).values() if o["tracked"]]
    return {
        "frames": frames, "seconds": seconds, "fps": rate(frames, seconds),
        "wall_seconds": wall_seconds, "wall_fps": rate(frames_run, wall_seconds) if frames_run else math.nan,
        "tracked_object_frames": tracked, "reused_object_frames": reused,
        "reuse_rate": reused / tracked if tracked else math.nan,
        "fps_sequence_mean": float(np.mean(seq_fps)) if seq_fps else math.nan,
        "reuse_rate_object_mean": float(np.mean(obj_rates)) if obj_rates else math.nan,
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Metrics on a results directory


def read_prediction(sequence_dir: str | os.PathLike, frame: str, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """The label PNG <sequence_dir>/<frame>.png as H x W uint8, checked against size (H, W)."""
    path = Path(sequence_dir) / f"{frame}.png"
    if not path.is_file():
        raise FileNotFoundError(f"result PNG not found: {path}")
    labels = read_label_png(path)
    if size is not None:
        _check_shape(labels, size, path)
    return labels


def _found_pngs(sequence_dir: Path, frames: SequenceType[str]) -> str:
    """What a results folder holds instead, for the message of a missing PNG: the folder is
    absent, its PNGs not named like any of `frames` (misnamed), or its first PNGs."""
    if not sequence_dir.is_dir():
        return f" (no folder {sequence_dir.name}/ in {sequence_dir.parent})"
    names = sorted(p.name for p in sequence_dir.glob("*.png"))
    expected = {f"{f}.png" for f in frames}
    strays = [n for n in names if n not in expected]
    if strays:
        return (f" ({len(strays)} PNG(s) there not named like a frame, e.g. {', '.join(strays[:3])}; frames are named "
                f"like {sorted(expected)[0]})")
    return f" (found {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else " (no PNG there)"


def _check_shape(labels: np.ndarray, size, path: Path) -> None:
    if tuple(labels.shape) != tuple(size):
        raise UsageError(f"{path} is {labels.shape[0]}x{labels.shape[1]} (HxW), expected "
                         f"{size[0]}x{size[1]}")


class LazyFrames:
    """Frames read one at a time when indexed (len() and [t] like a T x H x W volume), so that
    scoring a long sequence holds one frame in memory, not all of them: frames[t] is
    read(names[t])."""

    def __init__(self, read: Callable[[str], np.ndarray], names: SequenceType[str]):
        self.read, self.names = read, list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(self.names[index])


def sequence_volumes(results_directory: str | os.PathLike, sequence,
                     frames: Optional[SequenceType[str]] = None) -> tuple[LazyFrames, LazyFrames, dict]:
    """(ground truth, prediction, first_frames) of a sequence whose PNGs are in
    results_directory, over `frames` (default: every frame; e.g. only the annotated every-5th
    frames of YouTube-VOS train_all_frames), as LazyFrames (read when indexed).
    first_frames: object id -> index of its first frame within `frames`."""
    frames = list(frames if frames is not None else sequence.frame_names)
    first_frames = {}
    for obj_id, start in sequence.start_frames.items():
        if start not in frames:
            raise UsageError(f"sequence {sequence.name!r}: object {obj_id} starts at frame {start!r}, "
                             f"which is not among the evaluated (annotated) frames")
        first_frames[obj_id] = frames.index(start)
    gt, pred = _scored_frames(Path(results_directory) / sequence.name, sequence, frames)
    return gt, pred, first_frames


def _scored_frames(pred_dir: Path, sequence, frames: list[str]) -> tuple[LazyFrames, LazyFrames]:
    """(ground truth, prediction) label maps of `frames`, read lazily, one at a time; first checks
    that each frame has its ground truth and its PNG in pred_dir (FileNotFoundError naming it)."""
    sequence.check_ground_truth(frames)
    missing = [f for f in frames if not (pred_dir / f"{f}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"result PNG not found: {pred_dir / (missing[0] + '.png')}"
                                f"{_found_pngs(pred_dir, sequence.frame_names)}")
    return (LazyFrames(sequence.ground_truth_frame, frames),
            LazyFrames(lambda f: read_prediction(pred_dir, f, sequence.size), frames))


def evaluate_results_dir(results_directory: str | os.PathLike, sequences: Iterable[tuple]) -> dict:
    """lib.metrics.evaluate_results over sequences whose PNGs are in results_directory.

    sequences: iterable of (Sequence, frames or None), read one at a time. Returns overall
    J&F, J, F (means over all objects, each weighted equally), num_objects and per-sequence
    entries.
    """
    def items():
        for sequence, frames in sequences:
            gt, pred, first_frames = sequence_volumes(results_directory, sequence, frames)
            yield sequence.name, gt, pred, sequence.obj_ids, first_frames

    return evaluate_results(items())


def evaluate_lvos_results_dir(results_directory: str | os.PathLike, sequences: Iterable[tuple],
                              unseen: Iterable[str]) -> dict:
    """J&F, J, F and V by lvos-evaluation's protocol (lib.metrics.summarize_lvos) over sequences
    whose PNGs are in results_directory.

    sequences: iterable of (Sequence, {object id: range}) with range.start, .end, .length (the
    meta frame_nums) from the LVOS meta JSON (dataset.presets.LvosRange); frame names are
    the frame numbers (LVOS's 8 digits). An object's frames are start, start+5, ... < end, of
    which lib.metrics.lvos_scored_positions are scored. unseen: the unseen videos' names.
    """
    per_sequence = {}
    for sequence, ranges in sequences:
        by_number = {int(f): f for f in sequence.frame_names if f.isdigit()}
        pred_dir = Path(results_directory) / sequence.name
        objects = {}
        for obj_id, r in ranges.items():
            numbers = list(range(r.start, r.end, LVOS_STEP))
            frames = [by_number[numbers[k]] for k in lvos_scored_positions(len(numbers), r.length)]
            gt, pred = _scored_frames(pred_dir, sequence, frames)
            objects[obj_id] = evaluate_lvos_object(gt, pred, obj_id, r.length)
        per_sequence[sequence.name] = evaluate_lvos_sequence(objects)
    return summarize_lvos(per_sequence, unseen)


def evaluate_data_dir(results_directory: str | os.PathLike, data) -> dict:
    """The metrics of an evaluation's data (dataset.presets.EvalData with metric "davis" or
    "lvos") from the PNGs in results_directory: evaluate_results_dir on its scored frames, or
    evaluate_lvos_results_dir with its LVOS ranges and unseen list."""
    if data.metric == "lvos":
        return evaluate_lvos_results_dir(results_directory, [(s, data.lvos_ranges[s.name]) for s in data.sequences],
                                         data.lvos_unseen)
    return evaluate_results_dir(results_directory, [(s, data.eval_frames.get(s.name)) for s in data.sequences])


# ---------------------------------------------------------------------------------------------
# YouTube-VOS submission


def write_submission_zip(results_directory: str | os.PathLike, videos: Mapping[str, SequenceType[str]],
                         zip_path: Optional[str | os.PathLike] = None, prefix: str = "Annotations/") -> dict:
    """Zip the frames an evaluation server expects: `<prefix><video>/<frame>.png` for each video
    and frame of `videos` (video -> frame names, e.g. of valid/JPEGImages/<video>), taken from
    `<results dir>/<video>/<frame>.png` (so all-frames results give just the valid frames).
    prefix "Annotations/": YouTube-VOS; "": DAVIS test-dev and MOSE (video folders at the top).

    Videos without a complete result (not run yet, or a frame missing) are left out and
    reported. Written atomically to zip_path (default `<results dir>.zip`).
    Returns {"path", "videos", "frames", "missing": [video, ...]}.
    """
    results_directory = Path(results_directory)
    zip_path = Path(zip_path) if zip_path is not None else submission_zip_path(results_directory)
    complete, missing = [], []
    for video in sorted(videos):
        seq_dir = results_directory / video
        if (seq_dir / STATS_FILE).is_file() and all((seq_dir / f"{f}.png").is_file() for f in videos[video]):
            complete.append(video)
        else:
            missing.append(video)

    buffer = io.BytesIO()  # PNG label maps are small: build in memory, then write atomically
    frames = 0
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for video in complete:
            for frame in sorted(videos[video]):
                zf.write(results_directory / video / f"{frame}.png", f"{prefix}{video}/{frame}.png")
                frames += 1
    make_dirs(zip_path.parent, "the submission zip's folder")
    atomic_write_bytes(zip_path, buffer.getvalue())
    return {"path": str(zip_path), "videos": len(complete), "frames": frames, "missing": missing}


# ---------------------------------------------------------------------------------------------
# JSON


def _json_bytes(data) -> bytes:
    return (json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, data) -> None:
    """Strict JSON (NaN as null), written atomically."""
    path = Path(path)
    make_dirs(path.parent)
    atomic_write_bytes(path, _json_bytes(data))
