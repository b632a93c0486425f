"""Seeded synthetic data sets in the layouts of the newer benchmarks, for the tests: DAVIS 2017
test-dev, MOSE, LVOS and generic DAVIS / YouTube-VOS-layout folders. (YouTube-VOS 2019 has the
2018 layout: dataset.synthetic.make_ytvos_like.)

Frames and masks come from dataset.synthetic.render_sequence; every random number is seeded
from (seed, layout, sequence index), so the output depends only on the arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from dataset.synthetic import _write_jpeg, _write_json, _write_lines, render_sequence
from lib.fileio import make_dirs
from lib.image_io import write_label_png

SIZE = (120, 216)


def _write_video(image_dir: Path, anno_dir: Path, frames: np.ndarray, labels: np.ndarray, names: list[str],
                 annotated: list[int]) -> None:
    """JPEGs of every frame; label PNGs of the `annotated` frame indices (all objects present)."""
    make_dirs(image_dir)
    make_dirs(anno_dir)
    for t, name in enumerate(names):
        _write_jpeg(image_dir / f"{name}.jpg", frames[t])
    for t in annotated:
        write_label_png(anno_dir / f"{names[t]}.png", labels[t])


def _first_masks(anno_dir: Path, labels: np.ndarray, names: list[str], first_frames: list[int]) -> None:
    """YouTube-VOS-valid style: one PNG per frame where objects start, holding only those."""
    make_dirs(anno_dir)
    for first in sorted(set(first_frames)):
        starting = [k + 1 for k, f in enumerate(first_frames) if f == first]
        write_label_png(anno_dir / f"{names[first]}.png",
                        np.where(np.isin(labels[first], starting), labels[first], 0).astype(np.uint8))


def make_davis_testdev_like(root: str | Path, num_sequences: int = 2, num_frames: int = 6,
                            size: tuple[int, int] = SIZE, num_objects: int = 2, seed: int = 0) -> list[str]:
    """DAVIS 2017 test-dev layout: JPEGImages/480p/<seq>/, Annotations/480p/<seq>/00000.png only
    (first-frame masks), ImageSets/2017/test-dev.txt. Returns the sequence names."""
    root = Path(root)
    names = [f"synth-testdev-{i:02d}" for i in range(num_sequences)]
    for index, name in enumerate(names):
        frames, labels = render_sequence((seed, 11, index), num_frames, size, num_objects)
        stems = [f"{t:05d}" for t in range(num_frames)]
        _write_video(root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name, frames, labels,
                     stems, [0])
    _write_lines(root / "ImageSets" / "2017" / "test-dev.txt", names)
    return names


def make_mose_like(root: str | Path, num_sequences: int = 2, num_frames: int = 6, size: tuple[int, int] = SIZE,
                   num_objects: int = 2, seed: int = 0) -> dict[str, list[str]]:
    """MOSE layout: <root>/train/{JPEGImages,Annotations}/<video>/ with every frame annotated and
    <root>/valid/... with the first frame's mask only; no ImageSets. Returns {split: videos}."""
    root = Path(root)
    out = {}
    for code, split in enumerate(("train", "valid")):
        videos = [f"{'ab'[code]}{i:07x}" for i in range(num_sequences)]
        for index, video in enumerate(videos):
            frames, labels = render_sequence((seed, 12, code, index), num_frames, size, num_objects)
            stems = [f"{t:05d}" for t in range(num_frames)]
            annotated = list(range(num_frames)) if split == "train" else [0]
            _write_video(root / split / "JPEGImages" / video, root / split / "Annotations" / video, frames, labels,
                         stems, annotated)
        out[split] = videos
    return out


def make_lvos_like(root: str | Path, num_sequences: int = 2, num_frames: int = 21, size: tuple[int, int] = SIZE,
                   seed: int = 0, late_start: int = 5, early_end: Optional[int] = None) -> dict:
    """LVOS layout: <root>/valid/JPEGImages/<video>/<8-digit frame number from 1>.jpg,
    valid/Annotations/<video>/ every 5th frame of each object's range (all objects present in
    each PNG, as LVOS valid releases them), valid/valid_meta.json with each object's
    frame_range {start, end, frame_nums}. Object 1 starts at the first frame and its range
    ends `early_end` frames before the last (default 5); object 2 starts `late_start` frames in.
    Returns the meta "videos" dict."""
    root = Path(root) / "valid"
    early_end = 5 if early_end is None else early_end
    videos = {}
    for index in range(num_sequences):
        video = f"synthlv{index:02d}"
        first_frames = [0, late_start]
        frames, labels = render_sequence((seed, 13, index), num_frames, size, 2, first_frames)
        numbers = list(range(1, num_frames + 1))
        names = [f"{n:08d}" for n in numbers]
        ranges = {1: (0, num_frames - 1 - early_end), 2: (late_start, num_frames - 1)}
        annotated = sorted({t for lo, hi in ranges.values() for t in range(lo, hi + 1, 5)})
        _write_video(root / "JPEGImages" / video, root / "Annotations" / video, frames, labels, names, annotated)
        objects = {}
        for obj_id, (lo, hi) in ranges.items():
            start, end = numbers[lo], numbers[hi]
            objects[str(obj_id)] = {"frame_range": {"start": f"{start:08d}", "end": f"{end:08d}",
                                                    "frame_nums": len(range(start, end, 5))}}
        videos[video] = {"objects": objects}
    _write_json(root / "valid_meta.json", {"videos": videos})
    return videos


def make_folder_like(root: str | Path, layout: str = "davis", num_sequences: int = 2, num_frames: int = 6,
                     size: tuple[int, int] = SIZE, seed: int = 0, annotated: str = "all",
                     enter_at: Optional[int] = None, motion: str = "smooth") -> list[str]:
    """A user's own folder: JPEGImages/<video>/, Annotations/<video>/ (no 480p level, no
    ImageSets, no meta.json). annotated "all": every frame has a mask (J&F); "first": masks only
    where objects start (a zip). Object 2 enters at frame enter_at (default: 0 with "all", 2 with
    "first"). motion: as dataset.synthetic.render_sequence. Returns the video names."""
    root = Path(root)
    names = [f"{layout}-own-{i}" for i in range(num_sequences)]
    if enter_at is None:
        enter_at = 0 if annotated == "all" else 2
    first_frames = [0, min(enter_at, num_frames - 1)]
    for index, name in enumerate(names):
        frames, labels = render_sequence((seed, 14, index), num_frames, size, 2, first_frames, motion=motion)
        stems = [f"{t:05d}" for t in range(num_frames)]
        if annotated == "all":
            _write_video(root / "JPEGImages" / name, root / "Annotations" / name, frames, labels, stems,
                         list(range(num_frames)))
        else:
            _write_video(root / "JPEGImages" / name, root / "Annotations" / name, frames, labels, stems, [])
            _first_masks(root / "Annotations" / name, labels, stems, first_frames)
    return names


# An LVOS valid set with a results folder, for checking the scoring against lvos-evaluation:
# video -> (number of frames, {object id: (start, end, frame_nums, first, last)}). Frames are
# numbered from 1; an object is drawn on frames first..last (so it can be absent on scored
# frames), its range covers start, start+5, ... < end. "R3UJGYwy" is on LVOS's unseen list.
LVOS_SCORING_VIDEOS = {
    "synthsn0": (31, {1: (1, 26, 5, 1, 31),     # 5 frames in range, the last one not scored
                      2: (11, 31, 4, 11, 31),   # starts mid-video
                      3: (1, 16, 5, 1, 3)}),    # frame_nums above its 3 frames; absent when scored
    "R3UJGYwy": (21, {1: (6, 21, 3, 6, 21),
                      2: (1, 21, 4, 1, 21)}),
}


def _box(shape: tuple[int, int], top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[max(top, 0):max(top + height, 0), max(left, 0):max(left + width, 0)] = True
    return mask


def make_lvos_scoring_set(root: str | Path, results: str | Path, meta: str = "v1",
                          size: tuple[int, int] = SIZE) -> dict:
    """LVOS layout (<root>/valid/{JPEGImages,Annotations}/<video>/, valid/valid_meta.json) with
    the videos of LVOS_SCORING_VIDEOS, and a results folder <results>/<video>/<frame>.png whose
    boxes are shifted from the ground truth by a few pixels per frame (object 3 of synthsn0
    also shows up where it is absent). Deterministic (no random numbers). meta "v1": frame_range
    values as strings (e.g. "00000001"), "v2": as integers; lvos-evaluation reads both with int().
    Returns the meta "videos" dict."""
    split, results = Path(root) / "valid", Path(results)
    videos = {}
    for v, (video, (num_frames, objects)) in enumerate(LVOS_SCORING_VIDEOS.items()):
        names = [f"{n:08d}" for n in range(1, num_frames + 1)]
        gt = np.zeros((num_frames, *size), dtype=np.uint8)
        pred = np.zeros_like(gt)
        for obj_id, (start, end, frame_nums, first, last) in objects.items():
            for n in range(1, num_frames + 1):
                top, left = 10 + 25 * (obj_id - 1), 10 + 3 * n + 20 * v
                if first <= n <= last:
                    gt[n - 1][_box(size, top, left, 18, 30 + 2 * obj_id)] = obj_id
                if first <= n <= last or (obj_id == 3 and n == 11):
                    shift = (n * (obj_id + v)) % 7 - 2
                    pred[n - 1][_box(size, top + shift, left + 2 * shift, 18, 28 + obj_id)] = obj_id
        frames = np.repeat((40 + 60 * (gt > 0)).astype(np.uint8)[..., None], 3, axis=-1)
        annotated = sorted({n - 1 for start, end, *_ in objects.values() for n in range(start, end, 5)})
        _write_video(split / "JPEGImages" / video, split / "Annotations" / video, frames, gt, names, annotated)
        make_dirs(results / video)
        for t, name in enumerate(names):
            write_label_png(results / video / f"{name}.png", pred[t])
        as_value = (lambda n: f"{n:08d}") if meta == "v1" else (lambda n: n)
        videos[video] = {"objects": {str(obj_id): {"frame_range": {"start": as_value(start), "end": as_value(end),
                                                                   "frame_nums": frame_nums}}
                                     for obj_id, (start, end, frame_nums, *_) in objects.items()}}
    _write_json(split / "valid_meta.json", {"videos": videos})
    return videos
