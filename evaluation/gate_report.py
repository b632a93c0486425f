"""Gate report: does the reuse gate reuse where the last computed result stays valid, and what do
the reused frames cost?

It reads two evaluate.py result folders of the same checkpoint on the same frames, one at the
gate's threshold ("gated") and one at TH 1.0 ("plain", always computing), and the ground truth
(every frame annotated). Per tracked object-frame (each object's frames after its first):
* motion: the IoU of the object's ground-truth mask with its mask on the previous frame; an
  object-frame is *moving* below MOVING_IOU (0.9), else *still*;
* the gate's decision and reuse probability in the gated run (timeline.json);
* J (IoU, 1 when both empty) of the gated run's mask and of the plain run's mask.
Summary: the reuse rate on still and on moving object-frames; how well the reuse probability
separates still from moving ones (AUC: 0.5 not at all, 1.0 perfectly); and the mean J of the
reused object-frames against the same object-frames computed at TH 1.0 (likewise for the
computed ones).

    python -m tools.gate_report --gated result/<name>_0.7_fast --plain result/<name>_1.0_fast \\
        --annotations /path/to/Annotations [--json gate_report.json]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from evaluation.results import load_timeline
from lib.errors import UsageError
from lib.image_io import read_label_png
from lib.metrics import jaccard_index

MOVING_IOU = 0.9  # an object-frame is moving when its mask's IoU with the previous frame's is below this


@dataclass(frozen=True)
class ObjectFrame:
    sequence: str
    frame: str
    object_id: int
    reused: bool  # the gate's decision in the gated run
    reuse_prob: Optional[float]  # None in timelines written without probabilities
    motion_iou: float  # ground truth: IoU of the object's mask with its previous-frame mask
    j_gated: float
    j_plain: float

    @property
    def moving(self) -> bool:
        return self.motion_iou < MOVING_IOU


@dataclass(frozen=True)
class GateSummary:
    object_frames: int
    still: int
    moving: int
    reused_still: int
    reused_moving: int
    auc: Optional[float]  # P(p_reuse of a still object-frame > that of a moving one), ties 1/2
    reused_j_gated: float  # mean J of the reused object-frames, gated run
    reused_j_plain: float  # ... the same object-frames at TH 1.0
    computed_j_gated: float
    computed_j_plain: float


def _sequence_folders(results: Path) -> list[Path]:
    if not results.is_dir():
        raise FileNotFoundError(f"results folder not found: {results} (an evaluate.py output folder)")
    folders = sorted(p for p in results.iterdir() if (p / "timeline.json").is_file())
    if not folders:
        raise UsageError(f"{results} holds no <sequence>/timeline.json: not an evaluate.py results folder")
    return folders


def _labels(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return read_label_png(path)


def object_frames(gated: str | Path, plain: str | Path, annotations: str | Path) -> list[ObjectFrame]:
    """Per tracked object-frame of every sequence in `gated` (see the module docstring).
    `annotations` holds <sequence>/<frame>.png for every frame of those sequences."""
    gated, plain, annotations = Path(gated), Path(plain), Path(annotations)
    rows = []
    for folder in _sequence_folders(gated):
        seq = folder.name
        frames = load_timeline(folder / "timeline.json")["frames"]
        previous_gt = None
        for entry in frames:
            name = str(entry["frame"])
            gt = _labels(annotations / seq / f"{name}.png", "ground truth (--annotations)")
            if entry["reused"]:
                if previous_gt is None:
                    raise UsageError(f"{folder / 'timeline.json'}: objects tracked on its first frame {name}")
                ours = _labels(folder / f"{name}.png", "gated result")
                theirs = _labels(plain / seq / f"{name}.png", "TH 1.0 result (--plain)")
                probs = entry.get("reuse_prob", {})
                for key, reused in entry["reused"].items():
                    k = int(key)
                    rows.append(ObjectFrame(
                        seq, name, k, bool(reused), float(probs[key]) if key in probs else None,
                        jaccard_index(previous_gt == k, gt == k), jaccard_index(gt == k, ours == k),
                        jaccard_index(gt == k, theirs == k)))
            previous_gt = gt
    return rows


def rank_auc(positives: Sequence[float], negatives: Sequence[float]) -> Optional[float]:
    """P(a random positive scores above a random negative), ties counted 1/2; None if either is empty."""
    if not positives or not negatives:
        return None
    pos, neg = np.asarray(positives, dtype=float), np.asarray(negatives, dtype=float)
    above = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(above / (pos.size * neg.size))


def summarize(rows: Sequence[ObjectFrame]) -> GateSummary:
    def mean(values) -> float:
        values = list(values)
        return float(np.mean(values)) if values else math.nan
    still = [r for r in rows if not r.moving]
    moving = [r for r in rows if r.moving]
    reused = [r for r in rows if r.reused]
    computed = [r for r in rows if not r.reused]
    with_prob = all(r.reuse_prob is not None for r in rows)
    auc = rank_auc([r.reuse_prob for r in still], [r.reuse_prob for r in moving]) if with_prob else None
    return GateSummary(
        object_frames=len(rows), still=len(still), moving=len(moving),
        reused_still=sum(r.reused for r in still), reused_moving=sum(r.reused for r in moving), auc=auc,
        reused_j_gated=mean(r.j_gated for r in reused), reused_j_plain=mean(r.j_plain for r in reused),
        computed_j_gated=mean(r.j_gated for r in computed), computed_j_plain=mean(r.j_plain for r in computed))


def format_summary(s: GateSummary) -> str:
    """A few lines for the console."""
    def rate(n: int, d: int) -> str:
        return f"{n} of {d} ({100.0 * n / d:.1f}%)" if d else "0 of 0"
    lines = [f"reused {rate(s.reused_still, s.still)} still object-frames and {rate(s.reused_moving, s.moving)} "
             f"moving ones (moving: ground-truth mask IoU with the previous frame below {MOVING_IOU:g})"]
    if s.auc is not None:
        lines.append(f"reuse probability separates still from moving object-frames with AUC {s.auc:.2f} "
                     f"(0.5: not at all, 1: perfectly)")
    reused = s.reused_still + s.reused_moving
    if reused:
        lines.append(f"reused object-frames: J {100 * s.reused_j_gated:.1f}, the same frames computed at TH 1.0: "
                     f"J {100 * s.reused_j_plain:.1f}")
    else:
        lines.append("no object-frame was reused")
    if reused < s.object_frames:
        lines.append(f"computed object-frames: J {100 * s.computed_j_gated:.1f}, the same frames at TH 1.0: "
                     f"J {100 * s.computed_j_plain:.1f}")
    return "\n".join(lines)


def gate_report(gated: str | Path, plain: str | Path, annotations: str | Path) -> GateSummary:
    return summarize(object_frames(gated, plain, annotations))
