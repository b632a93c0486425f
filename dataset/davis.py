"""DAVIS 2016 / 2017 (480p) reader.

Layout under the root (as in DAVIS-2017-trainval-480p.zip):
    ImageSets/<year>/<split>.txt      sequence names, one per line
    JPEGImages/480p/<seq>/00000.jpg ...
    Annotations/480p/<seq>/00000.png ...  palette PNGs, pixel value = object id
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from dataset.sequence import VOID_LABEL, Sequence, SequenceList, resolve_root, sequence_frames
from lib.errors import UsageError
from lib.image_io import read_label_png

ROOT_HINT = "set the DAVIS root with --davis-root or the DAVIS_ROOT environment variable"
YEARS = ("2016", "2017")


@dataclass
class SequenceFiles:
    """The files of one sequence: frames in temporal order and their annotations."""
    name: str
    image_paths: list[Path]
    annotation_paths: dict[str, Path]  # frame stem -> label PNG, for frames that have one

    @property
    def frame_names(self) -> list[str]:
        return [p.stem for p in self.image_paths]


def resolve_davis_root(root: Optional[str | os.PathLike]) -> Path:
    """root, or $DAVIS_ROOT when root is None; FileNotFoundError if it is not a directory."""
    return resolve_root(root, "DAVIS", "DAVIS_ROOT", ROOT_HINT)


def list_davis_sequences(root: Optional[str | os.PathLike], year: str = "2017",
                         split: str = "val") -> list[str]:
    """Sorted sequence names of ImageSets/<year>/<split>.txt (split: train, val, ...)."""
    if year not in YEARS:
        raise ValueError(f"DAVIS year must be one of {YEARS}, got {year!r}")
    root = resolve_davis_root(root)
    imageset = root / "ImageSets" / year / f"{split}.txt"
    if not imageset.is_file():
        raise FileNotFoundError(f"DAVIS sequence list not found: {imageset} (is {root} a DAVIS "
                                f"root? {ROOT_HINT})")
    names = [line.strip() for line in imageset.read_text().splitlines()]
    return sorted(set(n for n in names if n))


def davis_sequence_files(root: Optional[str | os.PathLike], name: str) -> SequenceFiles:
    """Frame and annotation paths of one sequence (480p)."""
    root = resolve_davis_root(root)
    image_dir = root / "JPEGImages" / "480p" / name
    anno_dir = root / "Annotations" / "480p" / name
    images = sequence_frames(image_dir, anno_dir, "DAVIS", name, ROOT_HINT)
    annotations = {p.stem: p for p in sorted(anno_dir.glob("*.png"))}
    # The first frame's annotation is required; name its full path even when it is missing.
    annotations.setdefault(images[0].stem, anno_dir / f"{images[0].stem}.png")
    return SequenceFiles(name, images, annotations)


def davis_split(root: Optional[str | os.PathLike], year: str = "2017",
                split: str = "train") -> list[SequenceFiles]:
    """Files of every sequence of a split, e.g. for training on DAVIS 2017 train."""
    return [davis_sequence_files(root, name) for name in list_davis_sequences(root, year, split)]


class DAVISDataset(SequenceList):
    """DAVIS sequences of one split, as Sequence objects (built when accessed).

    year "2016": all objects merged into one (id 1); "2017": the objects are the ids present
    in the first frame's annotation. All objects start in the first frame.
    """

    def __init__(self, root: Optional[str | os.PathLike], year: str = "2017", split: str = "val",
                 sequences: Optional[Iterable[str]] = None) -> None:
        self.root = resolve_davis_root(root)
        self.year = year
        self.split = split
        self.name = f"dv{year}{split}"
        names = list_davis_sequences(self.root, year, split)
        if sequences is not None:
            wanted = list(sequences)
            unknown = [s for s in wanted if s not in names]
            if unknown:
                raise UsageError(f"sequences {unknown} are not in DAVIS {year} {split} "
                                 f"({self.root / 'ImageSets' / year / (split + '.txt')})")
            names = [n for n in names if n in set(wanted)]
        # Fail now rather than hours into a run.
        for sub in ("JPEGImages", "Annotations"):
            missing = [n for n in names if not (self.root / sub / "480p" / n).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} DAVIS {year} {split} sequence folder(s) not found, e.g. "
                    f"{self.root / sub / '480p' / missing[0]} (missing: {', '.join(missing[:5])}"
                    f"{', ...' if len(missing) > 5 else ''}; {ROOT_HINT})")
        self.sequence_names = names

    def sequence(self, name: str) -> Sequence:
        files = davis_sequence_files(self.root, name)
        first = files.image_paths[0].stem
        first_annotation = files.annotation_paths[first]
        labels = read_label_png(first_annotation)
        obj_ids = [int(i) for i in np.unique(labels) if i != 0 and i != VOID_LABEL]
        if not obj_ids:
            raise UsageError(f"first-frame annotation {first_annotation} contains no object "
                             f"(all pixels are background)")
        return Sequence(name, files.image_paths, files.annotation_paths,
                        {obj_id: first for obj_id in obj_ids},
                        merge_objects=self.year == "2016", dataset=self.name)

    def __repr__(self) -> str:
        return f"DAVISDataset({self.name}, {len(self)} sequences, root={self.root})"
