"""DAVIS 2017 evaluation: region similarity J, boundary accuracy F and their statistics.

Follows the official semi-supervised protocol of davis2017-evaluation (Pont-Tuset et al.):

* J = |gt & pred| / |gt | pred| per object and frame, 1 when both masks are empty.
* F = F-measure between the 1-pixel boundaries of gt and pred, a boundary pixel counting as
  matched when the other boundary lies within ceil(0.008 * image diagonal) pixels (a disk).
* Per object, frames strictly after the object's first frame and before the sequence's last
  frame are evaluated (for DAVIS, where all objects start at frame 0, these are frames
  1 .. T-2 as in the official code); Mean, Recall (fraction > 0.5) and Decay (first quarter
  minus last quarter) are computed over them.
* Overall numbers are means over all objects of all sequences, every object weighted equally;
  J&F = (mean J + mean F) / 2.

All scores are fractions in [0, 1].
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np

from lib.fileio import atomic_write_bytes, make_dirs

BOUNDARY_TOLERANCE = 0.008  # fraction of the image diagonal
STATISTICS = ("mean", "recall", "decay")


# ---------------------------------------------------------------------------------------------
# Per-frame measures


def jaccard_index(gt_mask: np.ndarray, pred_mask: np.ndarray) -> float:
    """Region similarity J of two binary masks (H x W): IoU, 1 when both are empty."""
    gt_mask = np.asarray(gt_mask).astype(bool)
    pred_mask = np.asarray(pred_mask).astype(bool)
    if gt_mask.shape != pred_mask.shape:
        raise ValueError(f"mask shapes differ: ground truth {gt_mask.shape}, prediction {pred_mask.shape}")
    intersection = np.count_nonzero(gt_mask & pred_mask)
    union = np.count_nonzero(gt_mask | pred_mask)
    if union == 0:
        return 1.0
    return intersection / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """1-pixel-wide boundary of a binary mask (H x W bool), as the official _seg2bmap computes it.

    A pixel is a boundary pixel when it differs from its right, lower or lower-right
    neighbour (so boundaries sit half a pixel towards the origin). In the last row only the
    right neighbour counts, in the last column only the lower one, and the bottom-right corner
    is never a boundary pixel.
    """
    seg = np.asarray(mask).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map expects an H x W mask, got shape {seg.shape}")
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    below_right = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    below_right[:-1, :-1] = seg[1:, 1:]

    edges = (seg ^ right) | (seg ^ below) | (seg ^ below_right)
    edges[-1, :] = seg[-1, :] ^ right[-1, :]
    edges[:, -1] = seg[:, -1] ^ below[:, -1]
    edges[-1, -1] = False
    return edges


def _disk(radius: int) -> np.ndarray:
    """Disk structuring element (2r+1 square, uint8): points with x^2 + y^2 <= r^2."""
    offsets = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(offsets, offsets)
    return (x ** 2 + y ** 2 <= radius ** 2).astype(np.uint8)


def boundary_tolerance(shape: Sequence[int], bound_th: float = BOUNDARY_TOLERANCE) -> int:
    """Matching distance in pixels for an image of shape (H, W): ceil(bound_th * diagonal)."""
    if bound_th >= 1:
        return int(math.ceil(bound_th))
    return int(np.ceil(bound_th * np.linalg.norm(shape)))


def boundary_f_measure(gt_mask: np.ndarray, pred_mask: np.ndarray,
                       bound_th: float = BOUNDARY_TOLERANCE) -> float:
    """Boundary accuracy F of two binary masks (H x W), as the official f_measure.

    Precision: fraction of predicted boundary pixels within the tolerance of the gt boundary;
    recall: the converse. Empty boundaries: both empty -> 1, exactly one empty -> 0.
    """
    gt_mask = np.asarray(gt_mask).astype(bool)
    pred_mask = np.asarray(pred_mask).astype(bool)
    if gt_mask.shape != pred_mask.shape:
        raise ValueError(f"mask shapes differ: ground truth {gt_mask.shape}, prediction {pred_mask.shape}")

    gt_boundary = boundary_map(gt_mask)
    pred_boundary = boundary_map(pred_mask)
    n_gt = int(np.count_nonzero(gt_boundary))
    n_pred = int(np.count_nonzero(pred_boundary))

    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        # One side has no boundary: precision or recall is 0, so F is 0.
        return 0.0

    kernel = _disk(boundary_tolerance(gt_mask.shape, bound_th))
    gt_dilated = cv2.dilate(gt_boundary.astype(np.uint8), kernel).astype(bool)
    pred_dilated = cv2.dilate(pred_boundary.astype(np.uint8), kernel).astype(bool)

    precision = np.count_nonzero(pred_boundary & gt_dilated) / float(n_pred)
    recall = np.count_nonzero(gt_boundary & pred_dilated) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# Statistics over frames


def frame_statistics(values: Sequence[float]) -> dict:
    """Mean, Recall (fraction of values > 0.5) and Decay of per-frame scores (1-D, no NaNs).

    Decay bins the frames as the official db_statistics: 5 edges at
    round(linspace(1, n, 5)) - 1, bin i = values[edge_i : edge_{i+1} + 1] (neighbouring bins
    share their edge frame), decay = mean(bin 0) - mean(bin 3). All NaN for an empty input.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "recall": math.nan, "decay": math.nan}
    # The official code casts the edges to uint8, which wraps beyond 256 frames; exact
    # integer edges here (identical up to 256 frames).
    edges = (np.round(np.linspace(1, n, 5) + 1e-10) - 1).astype(np.int64)
    bins = [values[edges[i]:edges[i + 1] + 1] for i in range(4)]
    return {
        "mean": float(np.mean(values)),
        "recall": float(np.mean(values > 0.5)),
        "decay": float(np.mean(bins[0]) - np.mean(bins[3])),
    }


def _nanmean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _mean_statistics(per_object: Sequence[dict], measure: str) -> dict:
    return {stat: _nanmean(obj[measure][stat] for obj in per_object) for stat in STATISTICS}


# ---------------------------------------------------------------------------------------------
# Sequences and data sets


def evaluate_sequence(gt, pred, object_ids: Iterable[int],
                      first_frames: Mapping[int, int] | None = None) -> dict:
    """Evaluate one sequence. gt, pred: label maps T x H x W (uint8 object ids): arrays, or any
    sequences of H x W frames supporting len() and indexing (read one frame at a time, so
    lazily loaded frames keep memory flat however long the sequence).

    object_ids: the objects to score (ids in gt; 255 in gt counts as background).
    first_frames: object id -> index of the frame where it starts (default 0 for all). Each
    object is scored on the frames strictly between its first frame and the last frame.

    Returns {"J&F": float, "J": {"mean", "recall", "decay"}, "F": {...},
             "objects": {id: {"J&F", "J": {...}, "F": {...}, "num_frames": int}}};
    sequence numbers are means over its objects (objects with no scored frame left out).
    """
    gt, pred = _frame_sequence(gt, "ground truth"), _frame_sequence(pred, "prediction")
    if len(gt) != len(pred):
        raise ValueError(f"ground truth has {len(gt)} frames, prediction {len(pred)}: the shapes differ")
    first_frames = dict(first_frames or {})
    num_frames = len(gt)
    ids = [int(i) for i in object_ids]
    first = {i: int(first_frames.get(i, 0)) for i in ids}
    j_values: dict[int, list] = {i: [] for i in ids}
    f_values: dict[int, list] = {i: [] for i in ids}
    for t in range(num_frames):
        active = [i for i in ids if first[i] < t < num_frames - 1]
        if not active:
            continue
        gt_t, pred_t = _label_frame(gt[t], "ground truth"), _label_frame(pred[t], "prediction")
        if gt_t.shape != pred_t.shape:
            raise ValueError(f"frame {t}: ground truth {gt_t.shape} and prediction {pred_t.shape} shapes differ")
        for obj_id in active:
            j_values[obj_id].append(jaccard_index(gt_t == obj_id, pred_t == obj_id))
            f_values[obj_id].append(boundary_f_measure(gt_t == obj_id, pred_t == obj_id))

    objects = {}
    for obj_id in ids:
        j_stats, f_stats = frame_statistics(j_values[obj_id]), frame_statistics(f_values[obj_id])
        objects[obj_id] = {
            "J&F": (j_stats["mean"] + f_stats["mean"]) / 2,
            "J": j_stats,
            "F": f_stats,
            "num_frames": len(j_values[obj_id]),
        }

    per_object = list(objects.values())
    j_stats, f_stats = _mean_statistics(per_object, "J"), _mean_statistics(per_object, "F")
    return {"J&F": (j_stats["mean"] + f_stats["mean"]) / 2, "J": j_stats, "F": f_stats,
            "objects": objects}


def evaluate_results(sequences: Iterable[tuple]) -> dict:
    """Evaluate a data set.

    sequences: iterable of (name, gt_frames, pred_frames, object_ids) or
    (name, gt_frames, pred_frames, object_ids, first_frames); frames are T x H x W arrays or
    lists of H x W arrays. Consumed one at a time, so it may be a lazy generator.

    Returns {"J&F", "J": {"mean", "recall", "decay"}, "F": {...}, "num_objects",
             "sequences": {name: evaluate_sequence(...)}}, overall numbers being means over all
    objects of all sequences (each object weighted equally).
    """
    per_sequence = {}
    for item in sequences:
        if len(item) not in (4, 5):
            raise ValueError("each sequence must be (name, gt_frames, pred_frames, object_ids"
                             "[, first_frames]), got a tuple of length %d" % len(item))
        name, gt_frames, pred_frames, object_ids = item[:4]
        first_frames = item[4] if len(item) == 5 else None
        if name in per_sequence:
            raise ValueError(f"sequence {name!r} given twice")
        per_sequence[name] = evaluate_sequence(gt_frames, pred_frames, object_ids, first_frames)

    return summarize_sequences(per_sequence)


def summarize_sequences(per_sequence: Mapping[str, dict]) -> dict:
    """Overall J&F, J, F over already scored sequences ({name: evaluate_sequence(...)} or
    evaluate_lvos_sequence(...)): means over all objects, each weighted equally."""
    per_sequence = dict(per_sequence)
    all_objects = [obj for seq in per_sequence.values() for obj in seq["objects"].values()]
    j_stats, f_stats = _mean_statistics(all_objects, "J"), _mean_statistics(all_objects, "F")
    return {"J&F": (j_stats["mean"] + f_stats["mean"]) / 2, "J": j_stats, "F": f_stats,
            "num_objects": len(all_objects), "sequences": per_sequence}


# ---------------------------------------------------------------------------------------------
# LVOS (lvos-evaluation, Hong et al., https://github.com/LingyiHongfd/lvos-evaluation, commit
# c05e889 "update code for v2", which scores LVOS v1 and v2): what differs from DAVIS is said in
# each function.

LVOS_STEP = 5
LVOS_TOOLKIT = "lvos-evaluation c05e889"
LVOS_DECAY_NOTE = ("null: lvos-evaluation bins each object's 1 x N score array along its first axis, so every "
                   "bin is the whole array and its decay is always 0 (not a measurement)")


def lvos_scored_positions(num_in_range: int, frame_nums: int) -> range:
    """Which of an object's frames start, start+5, ... < end (its meta frame_range) are scored:
    positions 1 .. frame_nums-2 of that list. lvos-evaluation skips position 0 (the start
    frame, the given mask) and position frame_nums-1, and its score array has frame_nums-2
    entries."""
    return range(1, min(num_in_range, frame_nums - 1))


def lvos_statistics(values: Sequence[float], frame_nums: int) -> dict:
    """Mean and Recall of one object's scores (those of lvos_scored_positions, in order) as
    lvos-evaluation computes them: they sit in a zero-filled array of frame_nums-2 entries, so
    entries without a scored frame count as 0. Decay: NaN (see LVOS_DECAY_NOTE)."""
    values = np.asarray(values, dtype=np.float64)
    size = frame_nums - 2
    if size < len(values):
        raise ValueError(f"LVOS frame_nums {frame_nums} leaves {max(size, 0)} entries for {len(values)} scored frames")
    if size <= 0:
        return {"mean": math.nan, "recall": math.nan, "decay": math.nan}
    padded = np.zeros(size, dtype=np.float64)
    padded[:len(values)] = values
    return {"mean": float(np.mean(padded)), "recall": float(np.mean(padded > 0.5)), "decay": math.nan}


def lvos_variance(j_values: Sequence[float], f_values: Sequence[float], frame_nums: int) -> float:
    """lvos-evaluation's V of one object: the standard deviation of (J + F) / 2 over the
    zero-filled frame_nums-2 entries, the variance rounded to 4 decimals before the square root
    (as its db_statistics_var). NaN when there is no entry."""
    size = frame_nums - 2
    if size <= 0:
        return math.nan
    j, f = np.zeros(size), np.zeros(size)
    j[:len(j_values)], f[:len(f_values)] = j_values, f_values
    jf = (j + f) / 2
    variance = np.sum((np.mean(jf) - jf) ** 2) / size
    return float(math.sqrt(round(np.float64(variance), 4)))


def evaluate_lvos_object(gt, pred, obj_id: int, frame_nums: int) -> dict:
    """One object by lvos-evaluation's protocol. gt, pred: K x H x W label maps (or sequences of
    H x W frames) of the object's scored frames (lvos_scored_positions); 255 is not treated as
    void. Returns {"J&F", "J", "F", "V", "num_frames"}."""
    gt, pred = _frame_sequence(gt, "ground truth"), _frame_sequence(pred, "prediction")
    if len(gt) != len(pred):
        raise ValueError(f"ground truth has {len(gt)} frames, prediction {len(pred)}: the shapes differ")
    j, f = [], []
    for t in range(len(gt)):
        gt_t, pred_t = _label_frame(gt[t], "ground truth") == obj_id, _label_frame(pred[t], "prediction") == obj_id
        j.append(jaccard_index(gt_t, pred_t))
        f.append(boundary_f_measure(gt_t, pred_t))
    j_stats, f_stats = lvos_statistics(j, frame_nums), lvos_statistics(f, frame_nums)
    return {"J&F": (j_stats["mean"] + f_stats["mean"]) / 2, "J": j_stats, "F": f_stats,
            "V": lvos_variance(j, f, frame_nums), "num_frames": len(j)}


def evaluate_lvos_sequence(objects: Mapping[int, dict]) -> dict:
    """A sequence from its objects' evaluate_lvos_object results; sequence numbers are means over
    its objects, as in evaluate_sequence."""
    objects = {int(k): v for k, v in objects.items()}
    per_object = list(objects.values())
    j_stats, f_stats = _mean_statistics(per_object, "J"), _mean_statistics(per_object, "F")
    return {"J&F": (j_stats["mean"] + f_stats["mean"]) / 2, "J": j_stats, "F": f_stats,
            "V": _nanmean(obj["V"] for obj in per_object), "objects": objects}


def summarize_lvos(per_sequence: Mapping[str, dict], unseen: Iterable[str]) -> dict:
    """lvos-evaluation's global numbers over scored sequences ({name: evaluate_lvos_sequence}):
    each of J, F, V is the mean of its seen-video object mean and its unseen-video object mean
    (videos listed in `unseen`), and J&F = (J + F) / 2, i.e. the mean of seen J, seen F, unseen
    J and unseen F. NaN (null) when one of the two groups has no object, as the toolkit prints.
    Also returns the seen / unseen groups and the plain mean over all objects ("all_objects")."""
    per_sequence, unseen = dict(per_sequence), set(unseen)
    groups = {"seen": [], "unseen": []}
    for name, seq in per_sequence.items():
        groups["unseen" if name in unseen else "seen"].extend(seq["objects"].values())
    summary = {}
    for group, objects in groups.items():
        j, f = _mean_statistics(objects, "J"), _mean_statistics(objects, "F")
        summary[group] = {"J&F": (j["mean"] + f["mean"]) / 2, "J": j, "F": f,
                          "V": _nanmean(obj["V"] for obj in objects), "num_objects": len(objects),
                          "videos": sorted(n for n in per_sequence if (n in unseen) == (group == "unseen"))}

    def both(get) -> float:
        return (get(summary["seen"]) + get(summary["unseen"])) / 2 if all(groups.values()) else math.nan

    j = {stat: both(lambda g: g["J"][stat]) for stat in STATISTICS}
    f = {stat: both(lambda g: g["F"][stat]) for stat in STATISTICS}
    everything = summarize_sequences(per_sequence)
    return {"J&F": (j["mean"] + f["mean"]) / 2, "J": j, "F": f, "V": both(lambda g: g["V"]),
            "num_objects": everything["num_objects"], "seen": summary["seen"], "unseen": summary["unseen"],
            "all_objects": {k: everything[k] for k in ("J&F", "J", "F")},
            "protocol": LVOS_TOOLKIT, "decay": LVOS_DECAY_NOTE, "sequences": per_sequence}


def _frame_sequence(frames, what: str):
    """Arrays as they are (checked to be T x H x W); other sequences of frames unchanged."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 3:
            raise ValueError(f"{what} must be T x H x W label maps, got shape {frames.shape}")
        return frames
    if not hasattr(frames, "__getitem__"):
        frames = list(frames)
    return frames


def _label_frame(frame, what: str) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"{what} frames must be H x W label maps, got shape {frame.shape}")
    return frame


# ---------------------------------------------------------------------------------------------
# Reporting

_COLUMNS = ("J&F", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def _row_values(entry: dict, with_v: bool = False) -> list:
    values = [entry["J&F"]] + [entry["J"][s] for s in STATISTICS] + [entry["F"][s] for s in STATISTICS]
    return values + [entry.get("V")] if with_v else values


def _fmt(value) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3f}"


def format_table(results: dict) -> str:
    """Text table: one row per sequence (object rows below multi-object ones), then overall; a V
    column when the results have one (LVOS)."""
    with_v = "V" in results
    rows = []
    for name, seq in results["sequences"].items():
        rows.append([name] + [_fmt(v) for v in _row_values(seq, with_v)])
        if len(seq["objects"]) > 1:
            for obj_id, obj in seq["objects"].items():
                rows.append([f"  {name}/{obj_id}"] + [_fmt(v) for v in _row_values(obj, with_v)])
    overall_name = f"overall ({results.get('num_objects', '?')} objects)"
    rows.append([overall_name] + [_fmt(v) for v in _row_values(results, with_v)])

    header = ["Sequence"] + list(_COLUMNS) + (["V"] if with_v else [])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(r)) for r in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def json_safe(value):
    """NaN / inf -> None, dict keys -> str, numpy scalars and paths -> plain values, recursively."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (int, str)) or value is None:
        return value
    return str(value)


def write_results(results: dict, out_dir: str | os.PathLike) -> None:
    """Write results.json (the whole dict, NaN as null) and results.csv into out_dir, atomically.

    The CSV has one row per (sequence, object) and a final row with sequence "overall"; a V
    column when the results have one (LVOS).
    """
    with_v = "V" in results
    out_dir = Path(out_dir)
    make_dirs(out_dir, "the results folder")

    text = json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out_dir / "results.json", text.encode("utf-8"))

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sequence", "object", "num_frames", "J&F", "J_mean", "J_recall", "J_decay",
                     "F_mean", "F_recall", "F_decay"] + (["V"] if with_v else []))
    for name, seq in results["sequences"].items():
        for obj_id, obj in seq["objects"].items():
            writer.writerow([name, obj_id, obj["num_frames"]] + [_csv_number(v) for v in _row_values(obj, with_v)])
    writer.writerow(["overall", "", ""] + [_csv_number(v) for v in _row_values(results, with_v)])
    atomic_write_bytes(out_dir / "results.csv", buffer.getvalue().encode("utf-8"))


def _csv_number(value) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))
