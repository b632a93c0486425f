"""Training samples (docs/training.md): one object of one sequence, the first frame where the object is
visible (the reference frame) and `sample_size - 1` other frames of the sequence drawn at random
(unsorted, as upstream).

Sources: DAVIS 2017 train, YouTube-VOS 2018 jjtrain, and synthetic DAVIS-layout data.
Per-object visibility comes from label pixel counts, computed once per data set and training
size and cached as JSON in a writable cache directory (never inside the package):

* YouTube-VOS: visible = at least 100 pixels;
* DAVIS: at least 100 pixels and, except in a few sequences, at least a fraction (usually 1/4)
  of the object's largest pixel count in the sequence, with upstream's per-sequence exceptions;
* in addition a reference frame must keep some of the object after resizing to the training
  size (otherwise its target model could not be trained).

Problems found when the sources are built (missing sequences, sequences too short for a
sample, objects never visible) are logged and skipped; a source left with nothing is an error.
An unreadable frame met during an epoch is logged and the sample replaced by another one.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from lib.errors import OutputError, UsageError
from lib.fileio import atomic_write_bytes, make_dirs
from lib.image_io import read_image, read_label_png, resize_image_bilinear, resize_labels_nearest

from .davis import list_davis_sequences, resolve_davis_root
from .ytvos import read_sequence_list, resolve_ytvos_root

log = logging.getLogger(__name__)

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
SAMPLE_SIZE = 6  # frames per sample (upstream N_seq): the reference frame and 5 others
MIN_VISIBLE_PIXELS = 100  # hard minimum (at the label's own resolution) for an object to be visible
DAVIS_SAMPLES_PER_OBJECT = 8  # DAVIS: samples per object and epoch
YTVOS_SAMPLES_PER_EPOCH = 4000  # YouTube-VOS: (video, object) pairs drawn per epoch

# Upstream's DAVIS 2017 train visibility rules. An object counts as occluded in a frame where its
# pixel count falls under a fraction of its largest count in the sequence (default 1/4) ...
DAVIS_OCCLUSION_FRACTION = {"bmx-bumps": 0.5, "disk-jockey": 0.5, "boxing-fisheye": 0.2, "cat-girl": 0.2,
                            "dog-gooses": 0.2, "tractor-sand": 0.1, "drone": 0.1}
DEFAULT_OCCLUSION_FRACTION = 0.25
# ... except in these sequences, where only the hard minimum applies ...
DAVIS_NEVER_OCCLUDED = {"bus", "car-turn", "drift-turn", "kid-football", "koala", "mallard-fly", "motocross-bumps",
                        "motorbike", "rallye", "snowboard", "train", "upside-down"}
# ... and in these frame ranges (start, stop) of these objects (None: every object), where the
# fraction rule is lifted as well.
DAVIS_FRACTION_RULE_LIFTED = {
    "classic-car": [((0, 56), None)],
    "drone": [((0, 17), 1), ((24, 60), 1)],  # the red quadcopter
    "night-race": [((0, 29), None), ((0, None), 2)],  # the green car
}


@dataclass
class SampleSpec:
    """One training sample: `frames` index the sequence's frames, frames[0] is the reference."""

    source: int
    sequence: str
    object_id: int
    frames: list[int]

    def describe(self, frame_names: Sequence[str]) -> str:
        return f"{self.sequence}/object {self.object_id}/frames {[frame_names[f] for f in self.frames]}"


def davis_visibility(sequence: str, counts: np.ndarray) -> np.ndarray:
    """Upstream's DAVIS visibility (frames x ids, bool) from pixel counts (frames x ids)."""
    fraction_ok = np.ones(counts.shape, dtype=bool)
    if sequence not in DAVIS_NEVER_OCCLUDED:
        fraction = DAVIS_OCCLUSION_FRACTION.get(sequence, DEFAULT_OCCLUSION_FRACTION)
        peak = counts.max(axis=0)
        fraction_ok = (counts / (peak + 0.001) >= fraction) & (peak > 0)
    for (start, stop), obj in DAVIS_FRACTION_RULE_LIFTED.get(sequence, ()):
        if obj is None:
            fraction_ok[start:stop, :] = True
        elif obj < counts.shape[1]:
            fraction_ok[start:stop, obj] = True
    return fraction_ok & (counts >= MIN_VISIBLE_PIXELS)


def plain_visibility(sequence: str, counts: np.ndarray) -> np.ndarray:
    """YouTube-VOS (and synthetic) visibility: at least MIN_VISIBLE_PIXELS pixels."""
    return counts >= MIN_VISIBLE_PIXELS


class TrainingSource:
    """Sequences of one data set with per-frame object visibility.

    `objects` lists the (sequence, object id) pairs that can be sampled; `reference[seq]`
    (frames x ids, bool) marks the frames that can be an object's reference frame.
    """

    def __init__(self, name: str, image_dir: Path, label_dir: Path, sequences: Sequence[str], cache_dir: Path,
                 size: tuple[int, int], min_length: int, visibility=plain_visibility,
                 samples_per_epoch: int = 0, repeats: int = 1):
        self.name = name
        self.image_dir = Path(image_dir)
        self.label_dir = Path(label_dir)
        self.size = tuple(size)
        self.samples_per_epoch = samples_per_epoch
        self.repeats = repeats
        self.frame_names: dict[str, list[str]] = {}
        self.reference: dict[str, np.ndarray] = {}

        missing = [s for s in sequences if not (self.label_dir / s).is_dir() or not (self.image_dir / s).is_dir()]
        if missing:
            if len(missing) == len(sequences):
                raise FileNotFoundError(f"{name}: none of the {len(sequences)} listed sequences has frames and "
                                        f"annotations under {self.image_dir} and {self.label_dir} "
                                        f"(e.g. {missing[0]!r}); check the data-set root")
            log.warning("%s: skipping %d of %d sequences without frames or annotations, e.g. %s",
                        name, len(missing), len(sequences), missing[:3])
        present = [s for s in sequences if s not in set(missing)]

        counts = self._pixel_counts(present, Path(cache_dir))
        short, never = [], 0
        for seq in present:
            names = counts[seq]["frames"]
            if len(names) < min_length:
                short.append(seq)
                continue
            original = np.asarray(counts[seq]["counts"], dtype=np.float64)
            resized = np.asarray(counts[seq]["resized"], dtype=np.float64)
            reference = visibility(seq, original) & (resized > 0)
            reference[:, 0] = False  # background
            self.frame_names[seq] = names
            self.reference[seq] = reference
            never += int((original[:, 1:].max(axis=0) > 0).sum() - reference[:, 1:].any(axis=0).sum())
        if short:
            log.warning("%s: skipping %d sequences with fewer than %d annotated frames, e.g. %s",
                        name, len(short), min_length, short[:3])
        if never:
            log.info("%s: skipping %d objects that are never visible enough to be a reference", name, never)
        self.objects = [(seq, int(obj)) for seq, ref in self.reference.items()
                        for obj in np.nonzero(ref.any(axis=0))[0]]
        if not self.objects:
            raise UsageError(f"{name}: no sequence with a visible object and >= {min_length} annotated frames "
                             f"under {self.label_dir}")

    def _pixel_counts(self, sequences: Sequence[str], cache_dir: Path) -> dict:
        """{seq: {"frames": [stem...], "counts": [[pixels of id 0, 1, ...] per frame],
        "resized": the same at the training size}}, cached in cache_dir."""
        h, w = self.size
        key = hashlib.sha1(json.dumps([str(self.label_dir.resolve()), sorted(sequences), [h, w]]).encode())
        cache = cache_dir / f"{self.name}_pixel_counts_{h}x{w}_{key.hexdigest()[:12]}.json"
        if cache.is_file():
            try:
                data = json.loads(cache.read_text())
                if set(sequences) <= set(data):
                    return data
            except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
                log.warning("unreadable visibility cache %s (%s): recomputing", cache, exc)
        data = {}
        for seq in tqdm(sequences, desc=f"{self.name}: object visibility", unit="seq"):
            paths = sorted((self.label_dir / seq).glob("*.png"))
            original, resized = [], []
            for p in paths:
                label = read_label_png(p)
                original.append(np.bincount(label.ravel(), minlength=1).tolist())
                resized.append(np.bincount(resize_labels_nearest(label, self.size).ravel(), minlength=1).tolist())
            width = max([len(r) for r in original] or [1])
            data[seq] = {"frames": [p.stem for p in paths],
                         "counts": [r + [0] * (width - len(r)) for r in original],
                         "resized": [r + [0] * (width - len(r)) for r in resized]}
        try:
            make_dirs(cache_dir)
            atomic_write_bytes(cache, json.dumps(data).encode())
        except OutputError as exc:
            log.warning("could not write the visibility cache %s (%s); it will be recomputed next time", cache, exc)
        return data

    def sample(self, rng: np.random.Generator, sample_size: int, source_index: int) -> list[SampleSpec]:
        """The samples of one epoch: per (sequence, object) pair (all of them, or
        `samples_per_epoch` drawn without replacement) `repeats` samples."""
        objects = self.objects
        if 0 < self.samples_per_epoch < len(objects):
            objects = [objects[i] for i in rng.choice(len(objects), size=self.samples_per_epoch, replace=False)]
        specs = []
        for seq, obj in objects:
            length = len(self.frame_names[seq])
            for _ in range(self.repeats):
                first = int(rng.choice(np.nonzero(self.reference[seq][:, obj])[0]))
                others = np.delete(np.arange(length), first)
                picked = rng.choice(others, size=sample_size - 1, replace=False)
                specs.append(SampleSpec(source_index, seq, obj, [first, *(int(f) for f in picked)]))
        return specs


def build_sources(dset: str, davis_root: Optional[str], ytvos_root: Optional[str], cache_dir: Path,
                  size: tuple[int, int] = (480, 854), sample_size: int = SAMPLE_SIZE,
                  ytvos_split_file: Optional[str] = None) -> list[TrainingSource]:
    """Sources for --dset: dv2017 | ytvos2018 (alias yt2018) | all (both) | synthetic (a
    DAVIS-layout root, e.g. written by dataset.synthetic, given as davis_root; visibility by the
    pixel minimum only)."""
    if sample_size < 2:
        raise ValueError(f"a sample needs at least 2 frames, got {sample_size}")
    sources = []
    if dset in ("dv2017", "all", "synthetic"):
        root = resolve_davis_root(davis_root)
        seqs = list_davis_sequences(root, "2017", "train")
        # Upstream: sequences of at least 4 frames; a sample needs sample_size + 1 (see sample()).
        sources.append(TrainingSource(
            "davis" if dset != "synthetic" else "synthetic", root / "JPEGImages" / "480p", root / "Annotations" / "480p",
            seqs, cache_dir, size, min_length=max(4, sample_size + 1),
            visibility=davis_visibility if dset != "synthetic" else plain_visibility,
            repeats=DAVIS_SAMPLES_PER_OBJECT))
    if dset in ("ytvos2018", "yt2018", "all"):
        root = resolve_ytvos_root(ytvos_root)
        split_file = Path(ytvos_split_file) if ytvos_split_file else SPLITS_DIR / "ytvos_jjtrain.txt"
        seqs = read_sequence_list(split_file)
        annotations = root / "train" / "Annotations"
        if not any((annotations / s).is_dir() for s in seqs):
            raise FileNotFoundError(f"all {len(seqs)} jjtrain videos are missing under {annotations}, "
                                    f"e.g. {seqs[0]!r} (--ytvos-root / $YTVOS_ROOT, --ytvos-split-file {split_file})")
        sources.append(TrainingSource("ytvos2018", root / "train" / "JPEGImages", annotations, seqs, cache_dir, size,
                                      min_length=sample_size + 2, visibility=plain_visibility,
                                      samples_per_epoch=YTVOS_SAMPLES_PER_EPOCH))
    if not sources:
        raise UsageError(f"unknown --dset {dset!r}: use dv2017, ytvos2018 (yt2018), all or synthetic")
    return sources


class TrainingSamples(Dataset):
    """Samples of one epoch: each item is (images (T, 3, H, W) uint8, labels (T, 1, H, W) uint8
    with the object as 1, index of the spec actually returned)."""

    MAX_REPLACEMENTS = 10

    def __init__(self, sources: Sequence[TrainingSource], specs: Sequence[SampleSpec], size: tuple[int, int]):
        self.sources = list(sources)
        self.specs = list(specs)
        self.size = tuple(size)

    def __len__(self) -> int:
        return len(self.specs)

    def describe(self, index: int) -> str:
        spec = self.specs[index]
        return f"{self.sources[spec.source].name}:" + spec.describe(self.sources[spec.source].frame_names[spec.sequence])

    def __getitem__(self, index: int):
        for attempt in range(self.MAX_REPLACEMENTS + 1):
            i = (index + attempt) % len(self.specs)
            try:
                images, labels = self.load(i)
                return images, labels, i
            except (OSError, ValueError) as exc:  # a corrupt or vanished file: log, use the next sample
                log.warning("skipping sample %s: %s", self.describe(i), exc)
        raise RuntimeError(f"{self.MAX_REPLACEMENTS + 1} samples in a row could not be read, the last: "
                           f"{self.describe(i)}; check the data set")

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `index` without replacement: images (T, 3, H, W), labels (T, 1, H, W), uint8."""
        spec = self.specs[index]
        frames = [self._frame(spec, f) for f in spec.frames]
        return torch.stack([image for image, _ in frames]), torch.stack([label for _, label in frames])

    def reference(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference frame of sample `index` as load() gives it: image (3, H, W), mask (1, H, W)."""
        spec = self.specs[index]
        return self._frame(spec, spec.frames[0])

    def _frame(self, spec: SampleSpec, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.sources[spec.source]
        name = src.frame_names[spec.sequence][frame]
        image = resize_image_bilinear(read_image(src.image_dir / spec.sequence / f"{name}.jpg"), self.size)
        label = resize_labels_nearest(read_label_png(src.label_dir / spec.sequence / f"{name}.png"), self.size)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy((label == spec.object_id).astype(np.uint8))[None])


class References(Dataset):
    """The reference frames of some samples of a TrainingSamples, for filling the target-model
    cache in DataLoader workers: item i is (sample index, image (3, H, W), mask (1, H, W)), or
    (sample index, None, None) when the frame cannot be read (logged; the epoch replaces that
    sample by another, as TrainingSamples does)."""

    def __init__(self, samples: TrainingSamples, indices: Sequence[int]):
        self.samples = samples
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            return (index, *self.samples.reference(index))
        except (OSError, ValueError) as exc:
            log.warning("cannot read the reference frame of sample %s: %s", self.samples.describe(index), exc)
            return index, None, None


def epoch_samples(sources: Sequence[TrainingSource], seed: int, epoch: int, sample_size: int) -> list[SampleSpec]:
    """The samples of an epoch, the same on every process (seeded by seed and epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return [spec for i, src in enumerate(sources) for spec in src.sample(rng, sample_size, i)]

