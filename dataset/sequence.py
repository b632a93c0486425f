"""A video sequence backed by JPEG frames and label PNGs on disk, read lazily."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence as SequenceType

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lib.errors import UsageError
from lib.image_io import read_image, read_label_png
from lib.video_io import FRAME_SUFFIXES, list_files

VOID_LABEL = 255  # DAVIS "void" pixels: never an object


def resolve_root(root: Optional[str | os.PathLike], data_set: str, env_var: str, hint: str) -> Path:
    """A data-set root: `root`, or ${env_var} when root is None; FileNotFoundError (naming
    `data_set` and giving `hint`) if it is not a directory."""
    if root is None:
        root = os.environ.get(env_var)
        if not root:
            raise FileNotFoundError(f"no {data_set} root given: {hint}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{data_set} root not found: {path} ({hint})")
    return path


def folder_listing(directory: Path) -> str:
    """What a folder holds, for error messages: its first entries (folders end with /)."""
    if not directory.is_dir():
        return "nothing there"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    return f"{', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''}" if entries else "an empty folder"


def list_frames(image_dir: Path, expected: str = "") -> list[Path]:
    """The frames of a video folder: its files with a `FRAME_SUFFIXES` suffix (any case), in natural
    order (lib.video_io.list_files). FileNotFoundError naming the folder, the `expected` layout
    and what it holds when there is none; UsageError when a frame is there twice (e.g.
    00000.jpg and 00000.png)."""
    images = list_files(image_dir, FRAME_SUFFIXES) if image_dir.is_dir() else []
    if not images:
        raise FileNotFoundError(f"no frames ({', '.join('*' + s for s in FRAME_SUFFIXES)}) in {image_dir}"
                                f"{f' (expected {expected})' if expected else ''}: found {folder_listing(image_dir)}")
    stems = Counter(p.stem for p in images)
    twice = sorted(p.name for p in images if stems[p.stem] > 1)
    if twice:
        raise UsageError(f"{image_dir} holds a frame twice ({', '.join(twice[:4])}): keep one of each")
    return images


def sequence_frames(image_dir: Path, anno_dir: Path, data_set: str, name: str, hint: str) -> list[Path]:
    """The sorted frames (list_frames) of sequence `name` of `data_set`; FileNotFoundError when
    its frame or annotation folder is missing or it has no frame."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{data_set} frames of sequence {name!r} not found: {image_dir} ({hint})")
    if not anno_dir.is_dir():
        raise FileNotFoundError(f"{data_set} annotations of sequence {name!r} not found: {anno_dir} ({hint})")
    return list_frames(image_dir, f"the {data_set} layout")


class Sequence:
    """One video for tracking and evaluation.

    Attributes:
        name: sequence name (directory name).
        frame_names: frame file stems in temporal order, e.g. ["00000", "00005", ...].
        obj_ids: ids of all objects, sorted.
        size: (H, W) of the frames.
        start_frames: object id -> name of the frame where the object is first annotated.
        image_paths: one JPEG path per frame.
        annotation_paths: frame name -> label PNG, for the frames that have one.

    Iterating yields per frame (image uint8 3 x H x W, labels uint8 H x W or None,
    new_object_ids). labels is given exactly on frames where at least one object starts and
    then holds only the objects starting there; every other pixel is 0 (objects that start
    later, or started earlier, are suppressed, as upstream does for YouTube-VOS).
    """

    def __init__(self, name: str, image_paths: SequenceType[Path],
                 annotation_paths: Mapping[str, Path], start_frames: Mapping[int, str],
                 merge_objects: bool = False, dataset: str = "") -> None:
        """merge_objects: all labelled pixels form one object, id 1 (DAVIS 2016)."""
        self.name = name
        self.dataset = dataset
        self.image_paths = [Path(p) for p in image_paths]
        if not self.image_paths:
            raise UsageError(f"sequence {name!r} has no frames")
        self.frame_names = [p.stem for p in self.image_paths]
        self.annotation_paths = {k: Path(v) for k, v in annotation_paths.items()}
        self.merge_objects = merge_objects

        start_frames = {int(k): str(v) for k, v in start_frames.items()}
        if not start_frames:
            raise UsageError(f"sequence {name!r} has no objects")
        for obj_id, frame in start_frames.items():
            if obj_id <= 0 or obj_id >= VOID_LABEL:
                raise UsageError(f"sequence {name!r}: invalid object id {obj_id}")
            if frame not in self.frame_names:
                raise UsageError(f"sequence {name!r}: object {obj_id} starts at frame {frame!r}, "
                                 f"but there is no such image (expected "
                                 f"{self.image_paths[0].parent / frame}{self.image_paths[0].suffix})")
            annotation = self.annotation_paths.get(frame)
            if annotation is None or not annotation.is_file():
                raise FileNotFoundError(f"sequence {name!r}: annotation of the frame where object "
                                        f"{obj_id} starts not found: "
                                        f"{annotation or frame + '.png'}")
        if merge_objects:
            start_frames = {1: min(start_frames.values(), key=self.frame_names.index)}
        self.start_frames = start_frames
        self.obj_ids = sorted(start_frames)

        self._new_objects: dict[str, list[int]] = {}
        for obj_id in self.obj_ids:
            self._new_objects.setdefault(start_frames[obj_id], []).append(obj_id)

        self.size = self._read_size(self.image_paths[0])

    @property
    def first_frame_indices(self) -> dict[int, int]:
        """Object id -> index of its first frame (for evaluate_sequence's first_frames)."""
        return {obj_id: self.frame_names.index(f) for obj_id, f in self.start_frames.items()}

    def __len__(self) -> int:
        return len(self.image_paths)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor], list[int]]]:
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Optional[torch.Tensor], list[int]]:
        """Frame index -> (image uint8 3 x H x W, labels uint8 H x W or None, new object ids)."""
        path = self.image_paths[index]
        image = read_image(path)
        self._check_size(image.shape[:2], path)
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

        frame = self.frame_names[index]
        new_ids = list(self._new_objects.get(frame, []))
        if not new_ids:
            return image, None, new_ids
        labels = self._start_labels(frame, new_ids)
        return image, torch.from_numpy(labels), new_ids

    def _start_labels(self, frame: str, new_ids: list[int]) -> np.ndarray:
        path = self.annotation_paths[frame]
        raw = read_label_png(path)
        self._check_size(raw.shape, path)
        if self.merge_objects:
            labels = ((raw != 0) & (raw != VOID_LABEL)).astype(np.uint8)
        else:
            labels = np.where(np.isin(raw, new_ids), raw, 0).astype(np.uint8)
        if not labels.any():
            raise UsageError(f"annotation {path} has no pixel of the object(s) {new_ids} that "
                             f"start in this frame (labels present: {np.unique(raw).tolist()})")
        return labels

    def annotation_path(self, frame: str) -> Path:
        """The ground-truth PNG of a frame: the known path, else <annotation dir>/<frame>.png (the
        annotation directory being that of the sequence's first annotated frame)."""
        known = self.annotation_paths.get(frame)
        if known is not None:
            return known
        return next(iter(self.annotation_paths.values())).parent / f"{frame}.png"

    def check_ground_truth(self, frames: Optional[SequenceType[str]] = None) -> None:
        """FileNotFoundError naming the first missing annotation of `frames` (default: all)."""
        for frame in frames if frames is not None else self.frame_names:
            path = self.annotation_path(frame)
            if not path.is_file():
                raise FileNotFoundError(f"annotation of frame {frame!r} of sequence {self.name!r} not found: "
                                        f"{path} (every evaluated frame needs one to compute J&F)")

    def ground_truth(self, frames: Optional[SequenceType[str]] = None) -> Optional[np.ndarray]:
        """Labels of `frames` (default: all), T x H x W uint8 (merged to 0/1 for DAVIS 2016).

        Without `frames`: None when some frame has no annotation (e.g. YouTube-VOS valid). With
        `frames`: each needs an annotation file (FileNotFoundError names the first missing one)."""
        if frames is None:
            if any(f not in self.annotation_paths for f in self.frame_names):
                return None
            frames = self.frame_names
        self.check_ground_truth(frames)
        return np.stack([self.ground_truth_frame(frame) for frame in frames])

    def ground_truth_frame(self, frame: str) -> np.ndarray:
        """One frame's labels, H x W uint8 (merged to 0/1 for DAVIS 2016); FileNotFoundError when
        it has no annotation file."""
        path = self.annotation_path(frame)
        labels = read_label_png(path)
        self._check_size(labels.shape, path)
        if self.merge_objects:
            labels = ((labels != 0) & (labels != VOID_LABEL)).astype(np.uint8)
        return labels

    def _check_size(self, shape, path: Path) -> None:
        if tuple(shape) != self.size:
            raise UsageError(f"{path} is {shape[0]}x{shape[1]} (HxW), but sequence {self.name!r} "
                             f"has frames of {self.size[0]}x{self.size[1]}")

    @staticmethod
    def _read_size(path: Path) -> tuple[int, int]:
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (UnidentifiedImageError, OSError) as exc:
            raise UsageError(f"cannot decode image {path}: {exc}") from exc
        return height, width

    def __repr__(self) -> str:
        prefix = f"{self.dataset}: " if self.dataset else ""
        return (f"{prefix}{self.name}: {len(self)} frames, {self.size[0]}x{self.size[1]}, "
                f"objects {self.obj_ids}")


class SequenceList:
    """Base of the data sets: `sequence_names`, and `sequence(name)` building a Sequence."""

    sequence_names: list[str]

    def sequence(self, name: str) -> Sequence:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.sequence_names)

    def __iter__(self):
        for name in self.sequence_names:
            yield self.sequence(name)

    def __getitem__(self, index: int) -> Sequence:
        return self.sequence(self.sequence_names[index])
