"""YouTube-VOS 2018 / 2019 reader (the two share a layout).

Layout under the root:
    train/JPEGImages/<vid>/*.jpg, train/Annotations/<vid>/*.png, train/meta.json
    train_all_frames/JPEGImages/<vid>/*.jpg
    valid/JPEGImages/<vid>/*.jpg, valid/Annotations/<vid>/*.png, valid/meta.json
    valid_all_frames/JPEGImages/<vid>/*.jpg
The *_all_frames folders may also sit in all_frames/ (all_frames/valid_all_frames/JPEGImages/),
as XMem's and Cutie's instructions place them. YouTube-VOS 2019 has the same layout.

meta.json: {"videos": {vid: {"objects": {"1": {"category": ..., "frames": ["00000", ...]}}}}};
an object starts at the first frame of its "frames" list.

Splits (as upstream lib/datasets.py):
    jjval             train/JPEGImages (every 5th frame, all annotated), train/Annotations,
                      sequences of splits/ytvos_jjvalid.txt: J&F computable
    jjval_all_frames  the same with train_all_frames/JPEGImages (annotated every 5th frame)
    jjtrain           like jjval with splits/ytvos_jjtrain.txt (for training)
    valid             valid/JPEGImages (every 5th frame), first-frame annotations of each object
    valid_all_frames  valid_all_frames/JPEGImages with valid/Annotations and valid/meta.json
Frames keep their native size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

from dataset.sequence import Sequence, SequenceList, folder_listing, resolve_root, sequence_frames
from lib.errors import UsageError

ROOT_HINT = "set the YouTube-VOS root with --ytvos-root or the YTVOS_ROOT environment variable"
SPLITS_DIR = Path(__file__).resolve().parent / "splits"

# split -> (image directory, annotation + meta.json directory, default sequence list or None)
_SPLITS = {
    "jjval": ("train", "train", "ytvos_jjvalid.txt"),
    "jjval_all_frames": ("train_all_frames", "train", "ytvos_jjvalid.txt"),
    "jjtrain": ("train", "train", "ytvos_jjtrain.txt"),
    "valid": ("valid", "valid", None),
    "valid_all_frames": ("valid_all_frames", "valid", None),
}
SPLITS = tuple(_SPLITS)


def resolve_ytvos_root(root: Optional[str | os.PathLike]) -> Path:
    """root, or $YTVOS_ROOT when root is None; FileNotFoundError if it is not a directory."""
    return resolve_root(root, "YouTube-VOS", "YTVOS_ROOT", ROOT_HINT)


def read_meta(path: Path) -> dict:
    """The "videos" dict of a YouTube-VOS meta.json."""
    if not path.is_file():
        raise FileNotFoundError(f"YouTube-VOS meta.json not found: {path} ({ROOT_HINT})")
    try:
        videos = json.loads(path.read_text())["videos"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a YouTube-VOS meta.json "
                         f"({{\"videos\": {{vid: {{\"objects\": ...}}}}}}): {exc}") from exc
    if not isinstance(videos, dict):
        raise UsageError(f"{path}: \"videos\" must be a dict of video id -> info")
    return videos


def read_sequence_list(path: str | os.PathLike) -> list[str]:
    """Sorted, de-duplicated video ids of a list file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"YouTube-VOS sequence list not found: {path}")
    return sorted(set(line.strip() for line in path.read_text().splitlines() if line.strip()))


def valid_frame_names(root: Optional[str | os.PathLike], video: str) -> list[str]:
    """Frame stems in valid/JPEGImages/<video> (the frames the evaluation server expects)."""
    image_dir = resolve_ytvos_root(root) / "valid" / "JPEGImages" / video
    if not image_dir.is_dir():
        raise FileNotFoundError(f"YouTube-VOS valid frames of {video!r} not found: {image_dir} "
                                f"({ROOT_HINT})")
    return sorted(p.stem for p in image_dir.glob("*.jpg"))


def image_split_dir(root: Path, image_split: str) -> Path:
    """<root>/<image_split>/JPEGImages, or <root>/all_frames/<image_split>/JPEGImages when only
    that exists (the XMem / Cutie placement of the *_all_frames folders)."""
    direct = root / image_split / "JPEGImages"
    nested = root / "all_frames" / image_split / "JPEGImages"
    return nested if image_split.endswith("_all_frames") and not direct.is_dir() and nested.is_dir() else direct


class YouTubeVOSDataset(SequenceList):
    """YouTube-VOS 2018 (or 2019: year, for names and messages) sequences of one split, as
    Sequence objects (built when accessed).

    split_file overrides the default sequence list of jjval / jjtrain; for valid splits it
    restricts the videos (default: every video directory in valid/Annotations).
    """

    def __init__(self, root: Optional[str | os.PathLike], split: str = "jjval",
                 sequences: Optional[Iterable[str]] = None,
                 split_file: Optional[str | os.PathLike] = None, year: str = "2018") -> None:
        if split not in _SPLITS:
            raise ValueError(f"YouTube-VOS split must be one of {SPLITS}, got {split!r}")
        self.root = resolve_ytvos_root(root)
        self.split, self.year = split, year
        self.name = f"ytvos{year}{split}"
        image_split, anno_split, list_name = _SPLITS[split]
        self.image_dir = image_split_dir(self.root, image_split)
        self.annotation_dir = self.root / anno_split / "Annotations"
        for directory in (self.image_dir, self.annotation_dir):
            if not directory.is_dir():
                also = (f" or {self.root / 'all_frames' / image_split / 'JPEGImages'}/"
                        if directory == self.image_dir and image_split.endswith("_all_frames") else "")
                raise FileNotFoundError(f"YouTube-VOS {year} directory not found: expected {directory}/{also} "
                                        f"(the YouTube-VOS {year} layout), found in {self.root}: "
                                        f"{folder_listing(self.root)} ({ROOT_HINT})")
        self.meta_path = self.root / anno_split / "meta.json"
        self.meta = read_meta(self.meta_path)

        if split_file is not None:
            names = read_sequence_list(split_file)
        elif list_name is not None:
            names = read_sequence_list(SPLITS_DIR / list_name)
        else:
            names = sorted(p.name for p in self.annotation_dir.iterdir() if p.is_dir())
        if sequences is not None:
            wanted = list(sequences)
            unknown = [s for s in wanted if s not in names]
            if unknown:
                raise UsageError(f"sequences {unknown} are not in YouTube-VOS {year} split {split}")
            names = [n for n in names if n in set(wanted)]
        # Fail now rather than hours into a run.
        for directory in (self.image_dir, self.annotation_dir):
            missing = [n for n in names if not (directory / n).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(names)} YouTube-VOS {year} {split} video folder(s) not "
                    f"found, e.g. {directory / missing[0]} (missing: {', '.join(missing[:5])}"
                    f"{', ...' if len(missing) > 5 else ''}; {ROOT_HINT}; for a different "
                    f"video list pass split_file)")
        self.sequence_names = names

    def start_frames(self, name: str) -> dict[int, str]:
        """Object id -> first frame name, from meta.json."""
        if name not in self.meta:
            raise UsageError(f"video {name!r} is not in {self.meta_path}")
        try:
            objects = self.meta[name]["objects"]
            return {int(obj_id): str(info["frames"][0]) for obj_id, info in objects.items()}
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise UsageError(f"{self.meta_path}: malformed entry for video {name!r}: {exc}") from exc

    def sequence(self, name: str) -> Sequence:
        image_dir = self.image_dir / name
        anno_dir = self.annotation_dir / name
        images = sequence_frames(image_dir, anno_dir, f"YouTube-VOS {self.year}", name, ROOT_HINT)
        image_stems = {p.stem for p in images}
        # Annotations of frames not among the images (jjval_all_frames keeps them all; valid has
        # none extra) are irrelevant to this sequence.
        annotations = {p.stem: p for p in sorted(anno_dir.glob("*.png")) if p.stem in image_stems}
        start_frames = self.start_frames(name)
        for frame in start_frames.values():
            annotations.setdefault(frame, anno_dir / f"{frame}.png")
        return Sequence(name, images, annotations, start_frames, dataset=self.name)

    def __repr__(self) -> str:
        return f"YouTubeVOSDataset({self.name}, {len(self)} sequences, root={self.root})"
