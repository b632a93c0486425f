"""Training samples (SPEC §8): one object of one sequence, the first frame where the object is
visible and `sample_size - 1` other frames drawn at random (unsorted, as upstream).

Sources: DAVIS 2017 train, YouTube-VOS 2018 jjtrain, and the synthetic DAVIS-layout data.
Per-object visibility comes from label pixel counts, computed once and cached as JSON in a
writable cache directory (never inside the package).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from lib.palette import atomic_write_bytes, read_image, read_label_png

from .davis import list_davis_sequences, resolve_davis_root
from .ytvos import read_sequence_list, resolve_ytvos_root

log = logging.getLogger(__name__)

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
MIN_VISIBLE_PIXELS = 100  # hard minimum for an object to count as visible in a frame

# Upstream's DAVIS 2017 train visibility rules: an object is occluded in a frame when its pixel
# count falls under a fraction of its maximum over the sequence (default 0.25), except in these
# sequences.
DAVIS_NEVER_OCCLUDED = {"bus", "car-turn", "drift-turn", "kid-football", "koala", "mallard-fly", "motocross-bumps",
                        "motorbike", "rallye", "snowboard", "train", "upside-down"}
DAVIS_OCCLUSION_FRACTION = {"bmx-bumps": 0.5, "disk-jockey": 0.5, "boxing-fisheye": 0.2, "cat-girl": 0.2,
                            "dog-gooses": 0.2, "tractor-sand": 0.1, "drone": 0.1}


@dataclass
class SampleSpec:
    """One training sample: `frames` index the sequence's frames, frames[0] is the reference."""

    source: int
    sequence: str
    object_id: int
    frames: list[int]

    def describe(self, frame_names: Sequence[str]) -> str:
        return f"{self.sequence}/object {self.object_id}/frames {[frame_names[f] for f in self.frames]}"


class TrainingSource:
    """Sequences of one data set with per-frame object visibility."""

    def __init__(self, name: str, image_dir: Path, label_dir: Path, sequences: Sequence[str],
                 cache_dir: Path, min_length: int, samples_per_epoch: int = 0, repeats: int = 1,
                 relative_occlusion: bool = False):
        self.name = name
        self.image_dir = image_dir
        self.label_dir = label_dir
        self.samples_per_epoch = samples_per_epoch
        self.repeats = repeats
        self.frame_names: dict[str, list[str]] = {}
        self.visible: dict[str, np.ndarray] = {}  # (frames, max id + 1) bool
        counts = self._pixel_counts(sequences, cache_dir)
        for seq in sequences:
            names, px = counts[seq]["frames"], np.asarray(counts[seq]["counts"], dtype=np.float64)
            if len(names) < min_length:
                log.warning("%s: skipping %s, %d annotated frames < %d", name, seq, len(names), min_length)
                continue
            self.frame_names[seq] = names
            self.visible[seq] = self._visibility(seq, px, relative_occlusion)
        self.objects = [(seq, int(obj)) for seq, vis in self.visible.items()
                        for obj in np.nonzero(vis[:, 1:].any(axis=0))[0] + 1]
        if not self.objects:
            raise ValueError(f"{name}: no sequence with a visible object and >= {min_length} annotated frames "
                             f"under {label_dir}")

    def _pixel_counts(self, sequences: Sequence[str], cache_dir: Path) -> dict:
        """{seq: {"frames": [stem...], "counts": [[pixels of id 0, 1, ...] per frame]}}, cached."""
        key = hashlib.sha1(json.dumps([str(self.label_dir.resolve()), sorted(sequences)]).encode()).hexdigest()[:12]
        cache = Path(cache_dir) / f"{self.name}_pixel_counts_{key}.json"
        if cache.is_file():
            try:
                data = json.loads(cache.read_text())
                if set(sequences) <= set(data):
                    return data
            except (json.JSONDecodeError, OSError) as exc:
                log.warning("unreadable visibility cache %s (%s): recomputing", cache, exc)
        data = {}
        for seq in tqdm(sequences, desc=f"{self.name}: object visibility", unit="seq"):
            seq_dir = self.label_dir / seq
            paths = sorted(seq_dir.glob("*.png"))
            if not paths:
                raise FileNotFoundError(f"{self.name}: no annotations in {seq_dir}")
            rows = []
            for p in paths:
                rows.append(np.bincount(read_label_png(p).ravel(), minlength=1).tolist())
            width = max(len(r) for r in rows)
            data[seq] = {"frames": [p.stem for p in paths], "counts": [r + [0] * (width - len(r)) for r in rows]}
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache, json.dumps(data).encode())
        return data

    @staticmethod
    def _visibility(seq: str, px: np.ndarray, relative: bool) -> np.ndarray:
        visible = px >= MIN_VISIBLE_PIXELS
        if relative and seq not in DAVIS_NEVER_OCCLUDED:
            fraction = DAVIS_OCCLUSION_FRACTION.get(seq, 0.25)
            peak = px.max(axis=0)
            visible &= (px / (peak + 0.001) >= fraction) & (peak > 0)
        visible[:, 0] = False
        return visible

    def sample(self, rng: np.random.Generator, sample_size: int, source_index: int) -> list[SampleSpec]:
        """The samples of one epoch."""
        objects = self.objects
        if self.samples_per_epoch > 0:
            n = min(self.samples_per_epoch, len(objects))
            objects = [objects[i] for i in rng.choice(len(objects), size=n, replace=False)]
        specs = []
        for seq, obj in objects:
            length = len(self.frame_names[seq])
            for _ in range(self.repeats):
                first = int(rng.choice(np.nonzero(self.visible[seq][:, obj])[0]))
                others = np.delete(np.arange(length), first)
                picked = rng.choice(others, size=min(sample_size, len(others)), replace=False).tolist()
                specs.append(SampleSpec(source_index, seq, obj, [first] + picked[1:]))
        return specs


def build_sources(dset: str, davis_root: Optional[str], ytvos_root: Optional[str], cache_dir: Path,
                  sample_size: int = 6, ytvos_split_file: Optional[str] = None) -> list[TrainingSource]:
    """Sources for --dset: dv2017 | ytvos2018 (alias yt2018) | all (both) | synthetic
    (a DAVIS-layout root, e.g. written by dataset.synthetic, given as davis_root)."""
    sources = []
    if dset in ("dv2017", "all", "synthetic"):
        root = resolve_davis_root(davis_root)
        seqs = list_davis_sequences(root, "2017", "train")
        sources.append(TrainingSource("davis" if dset != "synthetic" else "synthetic", root / "JPEGImages" / "480p",
                                      root / "Annotations" / "480p", seqs, cache_dir, min_length=4,
                                      repeats=8, relative_occlusion=dset != "synthetic"))
    if dset in ("ytvos2018", "yt2018", "all"):
        root = resolve_ytvos_root(ytvos_root)
        seqs = read_sequence_list(ytvos_split_file or SPLITS_DIR / "ytvos_jjtrain.txt")
        missing = [s for s in seqs if not (root / "train" / "Annotations" / s).is_dir()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} jjtrain videos are missing under {root / 'train' / 'Annotations'}, "
                                    f"e.g. {missing[0]!r} (--ytvos-root / $YTVOS_ROOT, --ytvos-split-file)")
        sources.append(TrainingSource("ytvos2018", root / "train" / "JPEGImages", root / "train" / "Annotations",
                                      seqs, cache_dir, min_length=sample_size + 2, samples_per_epoch=4000))
    if not sources:
        raise ValueError(f"unknown --dset {dset!r}: use dv2017, ytvos2018 (yt2018), all or synthetic")
    return sources


class TrainingSamples(Dataset):
    """Samples of one epoch: each item is (images (T, 3, H, W) uint8, labels (T, 1, H, W) uint8
    with the object as 1, index of the spec)."""

    def __init__(self, sources: Sequence[TrainingSource], specs: Sequence[SampleSpec], size: tuple[int, int]):
        self.sources = list(sources)
        self.specs = list(specs)
        self.size = size

    def __len__(self) -> int:
        return len(self.specs)

    def describe(self, index: int) -> str:
        spec = self.specs[index]
        return f"{self.sources[spec.source].name}:" + spec.describe(self.sources[spec.source].frame_names[spec.sequence])

    def __getitem__(self, index: int):
        spec = self.specs[index]
        src = self.sources[spec.source]
        h, w = self.size
        images, labels = [], []
        for f in spec.frames:
            name = src.frame_names[spec.sequence][f]
            image = read_image(src.image_dir / spec.sequence / f"{name}.jpg")
            # Upstream meant INTER_AREA / INTER_CUBIC but passed them as cv2.resize's `dst`
            # argument, so it resized bilinearly; so do we.
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            label = read_label_png(src.label_dir / spec.sequence / f"{name}.png") == spec.object_id
            label = F.interpolate(torch.from_numpy(label).float()[None, None], (h, w), mode="nearest")
            images.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
            labels.append(label[0].to(torch.uint8))
        return torch.stack(images), torch.stack(labels), index


def epoch_samples(sources: Sequence[TrainingSource], seed: int, epoch: int, sample_size: int) -> list[SampleSpec]:
    """The samples of an epoch, the same on every process (seeded by seed and epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return [spec for i, src in enumerate(sources) for spec in src.sample(rng, sample_size, i)]


def default_cache_dir() -> Path:
    return Path(os.environ.get("RVOS_CACHE", "./save_dir/cache"))
