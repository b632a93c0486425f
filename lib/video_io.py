"""Reading videos, frame folders and first-frame masks for segmenting one's own video.

* `open_frames(path)`: an MP4 (any file cv2.VideoCapture decodes) or a folder of JPG/PNG frames,
  sorted by name (natural order: "f2" before "f10"). Frame stems are the file stems for a
  folder and "00000", "00001", ... for a video file. Frames are RGB uint8 H x W x 3; all frames
  of a video must have the same size.
* `MaskSet(path)`: one label PNG (the first frame's mask) or a folder of label PNGs named like
  the frames (same stems; for a video file the stem is the frame number, "00012" or "12").
  Pixel values are object ids (palette indices, 0 = background). An object starts at the first
  frame whose PNG holds its id; later PNGs never re-initialize an object already started.
* Resizing: frames whose shorter side exceeds `max_size` are tracked at a smaller size
  (`processing_size`): images with `lib.image_io.resize_image_area`, masks with
  `resize_labels_nearest_exact`. Masks of any
  size with the frame's aspect ratio (within one mask pixel) are accepted: the original frame
  size, the tracking size, or e.g. a 480p annotation of a full-resolution video.
* `TrackerFeed`: the `(image 3xHxW uint8 tensor, labels HxW uint8 tensor or None, new ids)`
  iterator `Tracker.track` consumes, keeping each frame's stem and original image for the caller.

Errors name the path and, when given, the command-line flag (`flag="--video"`): missing files
raise FileNotFoundError, unreadable or inconsistent inputs lib.cli.UsageError.
"""
from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np
import torch

from lib.errors import UsageError
from lib.image_io import read_image, read_label_png, resize_image_area, resize_labels_nearest_exact

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")  # frames of a folder: of a video, a data set, a results visual
MASK_SUFFIXES = (".png",)


def _prefix(flag: Optional[str]) -> str:
    return f"{flag}: " if flag else ""


def _existing(path: str | os.PathLike, flag: Optional[str], what: str) -> Path:
    """`path` with ~ expanded; FileNotFoundError naming the flag and `what` was expected if missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{_prefix(flag)}no such {what}: {path}")
    return path


def natural_key(name: str) -> list:
    """Sort key comparing digit runs as numbers: "f2" < "f10"; zero-padded names sort as usual."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part != ""]


def list_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of folder with one of the (lower-case) suffixes, any case, hidden files left
    out, in natural order (frame2 before frame10)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes
             and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


# ---------------------------------------------------------------------------------------------
# Resizing


def processing_size(height: int, width: int, max_size: Optional[int]) -> tuple[int, int]:
    """Size (H, W) frames are tracked at: unchanged if the shorter side is <= max_size (or
    max_size is 0/None), else scaled so that the shorter side is exactly max_size."""
    short = min(height, width)
    if not max_size or short <= max_size:
        return height, width
    scale = max_size / short
    if height <= width:
        return max_size, max(1, int(round(width * scale)))
    return max(1, int(round(height * scale))), max_size


def same_aspect(mask_size: tuple[int, int], frame_size: tuple[int, int]) -> bool:
    """Whether a mask of mask_size (H, W) can be resized to frame_size: equal aspect ratio, up to
    one pixel of rounding in each direction (e.g. DAVIS 854x480 for a 1920x1080 frame)."""
    mh, mw = mask_size
    fh, fw = frame_size
    if min(mh, mw, fh, fw) <= 0:
        return False
    width_err = abs(mw * fh / mh - fw)  # mask width scaled to the frame, in frame pixels
    height_err = abs(mh * fw / mw - fh)
    return width_err <= max(1.0, fw / mw) and height_err <= max(1.0, fh / mh)


# ---------------------------------------------------------------------------------------------
# Frames


class FrameSource:
    """The frames of a video file or of a folder of images; iterate for (stem, RGB H x W x 3).

    Attributes: path, name (video file stem or folder name), kind ("video" or "folder"),
    size (H, W) of the frames, fps (the video's frame rate, None for folders or when unknown),
    stems (list, folders only; None for video files, whose frames are counted while decoding),
    num_frames (exact for folders, the container's count (may be approximate) for videos).
    """

    def __init__(self, path: str | os.PathLike, flag: Optional[str] = None):
        self.path = _existing(path, flag, "video file or frame folder")
        self.flag = flag
        p = _prefix(flag)
        self.fps: Optional[float] = None
        if self.path.is_dir():
            self.kind = "folder"
            self.name = self.path.resolve().name
            self._files = list_files(self.path, FRAME_SUFFIXES)
            if not self._files:
                raise UsageError(f"{p}frame folder {self.path} holds no image files "
                                 f"({', '.join(FRAME_SUFFIXES)})")
            self.stems: Optional[list[str]] = [f.stem for f in self._files]
            duplicates = sorted({s for s in self.stems if self.stems.count(s) > 1})
            if duplicates:
                raise UsageError(f"{p}frame folder {self.path} has several images with the same stem: "
                                 f"{duplicates[:5]} (e.g. both .jpg and .png)")
            self.num_frames: Optional[int] = len(self._files)
            self.size = self._read_file(self._files[0]).shape[:2]
        else:
            self.kind = "video"
            self.name = self.path.stem
            self.stems = None
            capture = self._open_capture()
            try:
                ok, frame = capture.read()
                if not ok or frame is None:
                    raise UsageError(f"{p}cannot decode any frame of video {self.path}")
                self.size = frame.shape[:2]
                fps = capture.get(cv2.CAP_PROP_FPS)
                self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else None
                count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
                self.num_frames = count if count > 0 else None
            finally:
                capture.release()

    def _open_capture(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise UsageError(f"{_prefix(self.flag)}cannot open {self.path} as a video (not a video file "
                             f"cv2 can decode, and not a folder of frames)")
        return capture

    def _read_file(self, file: Path) -> np.ndarray:
        try:
            return read_image(file)
        except ValueError as exc:
            raise UsageError(f"{_prefix(self.flag)}{exc}") from exc

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        if self.kind == "folder":
            for file in self._files:
                image = self._read_file(file)
                if image.shape[:2] != tuple(self.size):
                    raise UsageError(f"{_prefix(self.flag)}frame {file} is {image.shape[1]}x{image.shape[0]}, "
                                     f"but the first frame is {self.size[1]}x{self.size[0]}: all frames "
                                     f"must have the same size")
                yield file.stem, image
            return
        capture = self._open_capture()
        try:
            index = 0
            while True:
                ok, frame = capture.read()
                if not ok or frame is None:
                    break
                if frame.shape[:2] != tuple(self.size):
                    raise UsageError(f"{_prefix(self.flag)}frame {index} of {self.path} changes size to "
                                     f"{frame.shape[1]}x{frame.shape[0]}")
                yield f"{index:05d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            capture.release()


def open_frames(path: str | os.PathLike, flag: Optional[str] = None) -> FrameSource:
    """Frames of an MP4 (or other video file) or a folder of JPG/PNG images, see FrameSource."""
    return FrameSource(path, flag)


# ---------------------------------------------------------------------------------------------
# Masks


@dataclass
class ObjectStart:
    """Objects starting at one frame: their ids and the mask (uint8 H x W, PNG size) holding them."""

    key: str  # mask PNG stem ("" for a single first-frame PNG)
    path: Path
    labels: np.ndarray
    new_ids: list[int]


class MaskSet:
    """First-frame mask(s): a single label PNG (first frame) or a folder of label PNGs.

    Every PNG is read once here; `starts` lists, in frame order once matched, the PNGs where some
    object appears for the first time. Raises FileNotFoundError for a missing path, ValueError
    for unreadable PNGs, a folder without PNGs, or masks holding no object at all.
    """

    def __init__(self, path: str | os.PathLike, flag: Optional[str] = None):
        self.path = _existing(path, flag, "mask PNG or mask folder")
        self.flag = flag
        p = _prefix(flag)
        self.single = not self.path.is_dir()
        if self.single:
            files = [self.path]
        else:
            files = list_files(self.path, MASK_SUFFIXES)
            if not files:
                raise UsageError(f"{p}mask folder {self.path} holds no .png files")
        self.keys = [("" if self.single else f.stem) for f in files]
        self.starts: list[ObjectStart] = []
        seen: set[int] = set()
        for key, file in zip(self.keys, files):
            try:
                labels = read_label_png(file)
            except ValueError as exc:
                raise UsageError(f"{p}{exc}") from exc
            ids = [int(i) for i in np.unique(labels) if i != 0]
            new = [i for i in ids if i not in seen]
            if new:
                seen.update(new)
                self.starts.append(ObjectStart(key, file, labels, new))
        if not seen:
            where = f"mask {self.path}" if self.single else f"every PNG in mask folder {self.path}"
            raise UsageError(f"{p}{where} holds no object: every pixel is 0 (background); object ids "
                             f"are the pixel values (palette indices) of a label PNG")
        self.object_ids = sorted(seen)

    def match(self, frames: FrameSource) -> dict[str, ObjectStart]:
        """{frame stem: ObjectStart} for the frames where objects start, checking that every mask
        PNG names a frame and that mask sizes fit the frames (see `same_aspect`)."""
        p = _prefix(self.flag)
        if self.single:
            matched = {None: self.starts[0]}
        elif frames.kind == "folder":
            stems = set(frames.stems or [])
            unknown = [k for k in self.keys if k not in stems]
            if unknown:
                raise UsageError(f"{p}mask PNGs in {self.path} name no frame of {frames.path}: "
                                 f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} (mask PNGs must have "
                                 f"the stems of the frames, e.g. {frames.stems[0]}.png)")
            matched = {s.key: s for s in self.starts}
        else:  # video file: PNG stems are frame numbers
            bad = [k for k in self.keys if not k.isdigit()]
            if bad:
                raise UsageError(f"{p}mask PNGs for the video file {frames.path} must be named by frame "
                                 f"number (00000.png, 00001.png, ...), got {bad[:5]}")
            late = [k for k in self.keys if frames.num_frames and int(k) >= frames.num_frames]
            if late:
                raise UsageError(f"{p}mask PNGs {late[:5]} in {self.path} are beyond the last frame of "
                                 f"{frames.path} ({frames.num_frames} frames)")
            matched = {f"{int(s.key):05d}": s for s in self.starts}
        for start in matched.values():
            if not same_aspect(start.labels.shape, frames.size):
                mh, mw = start.labels.shape
                fh, fw = frames.size
                raise UsageError(f"{p}mask {start.path} is {mw}x{mh}, which does not fit the {fw}x{fh} "
                                 f"frames of {frames.path}: masks must have the frame size (or the same "
                                 f"aspect ratio; they are resized to the tracking size)")
        return matched


# ---------------------------------------------------------------------------------------------
# Tracker input


class TrackerFeed:
    """Iterator of tracker inputs for `Tracker.track`, at `size` (H, W).

    Yields (image uint8 3 x H x W tensor, labels uint8 H x W tensor or None, new object ids). For
    each frame it yields, (stem, original RGB frame) is appended to `pending`; pop one with
    `pop()` per tracker result. `starts` maps frame stems (None = the first frame) to
    ObjectStarts; `used` collects the stems of the starts that were consumed.
    """

    def __init__(self, frames: FrameSource, starts: dict, size: tuple[int, int]):
        self.frames = frames
        self.starts = dict(starts)
        self.size = tuple(size)
        self.pending: deque[tuple[str, np.ndarray]] = deque()
        self.used: set = set()
        self.count = 0

    def __iter__(self):
        for index, (stem, rgb) in enumerate(self.frames):
            key = None if index == 0 and None in self.starts else stem
            start = self.starts.get(key)
            image = torch.from_numpy(np.ascontiguousarray(resize_image_area(rgb, self.size))).permute(2, 0, 1)
            labels, new_ids = None, []
            if start is not None:
                self.used.add(key)
                labels = torch.from_numpy(np.ascontiguousarray(resize_labels_nearest_exact(start.labels, self.size)))
                # An object whose mask vanished in the resize would fail in the tracker; say why.
                present = set(int(i) for i in torch.unique(labels).tolist())
                lost = [i for i in start.new_ids if i not in present]
                if lost:
                    raise UsageError(f"objects {lost} of mask {start.path} vanish when the mask is resized "
                                     f"to the tracking size {self.size[1]}x{self.size[0]} (too small); "
                                     f"raise --max-size")
                new_ids = list(start.new_ids)
            self.pending.append((stem, rgb))
            self.count += 1
            yield image, labels, new_ids

    def pop(self) -> tuple[str, np.ndarray]:
        return self.pending.popleft()

    def current_stem(self, _index: Optional[int] = None) -> str:
        """The stem of the oldest frame not yet popped: that of the tracker's next result."""
        return self.pending[0][0]

    def unused(self) -> list:
        """Starts that no frame consumed (a mask PNG beyond the video's end)."""
        return [k for k in self.starts if k not in self.used]
