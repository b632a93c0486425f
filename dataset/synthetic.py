"""Seeded synthetic video data in the DAVIS and YouTube-VOS 2018 layouts.

Each sequence: a textured background and several textured ellipses on it. Objects are drawn in
id order, so a higher id occludes a lower one where they overlap. Two kinds of motion:

* "smooth" (default): the background pans slowly and the objects move smoothly across it, their
  paths crossing mid-sequence (occlusions);
* "stop-and-go": a still camera and a calmer background; each object holds still (drifting by
  at most DRIFT_MAX pixels per frame) for stretches of several frames (HOLD), then dashes in a
  few frames to a random place elsewhere, spinning, often across another object (occlusion). The holds are where the last
  computed mask stays valid (a reuse gate should reuse), the dashes where it must compute.

In the YouTube-VOS layout the last object of every video enters later (its first frame is a
multiple of 5, so that it is annotated in the every-5th-frame splits). Output depends only on
the arguments: every random number comes from numpy Generators seeded from (seed, layout, split,
sequence index).

CLI: python -m tools.synthetic_data --out DIR --layout davis|ytvos [--seed N --sequences N
     --frames N --size HxW --objects N --motion smooth|stop-and-go]
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence as SequenceType

import numpy as np
from PIL import Image

from lib.fileio import atomic_write_bytes, make_dirs
from lib.image_io import write_label_png

YTVOS_STEP = 5  # YouTube-VOS annotates (and its non-"all_frames" splits hold) every 5th frame
MOTIONS = ("smooth", "stop-and-go")
DRIFT_MAX = 0.25  # stop-and-go: largest drift of a holding object, pixels per frame
HOLD = (0.3, 0.6)  # stop-and-go: a hold lasts this fraction of the sequence (at least 3 frames)
CALM = 0.35  # stop-and-go: the background's texture contrast, relative to smooth motion's


# ---------------------------------------------------------------------------------------------
# Rendering


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Smooth random field in [-1, 1] (H x W): coarse uniform noise, bilinearly upsampled."""
    h, w = shape
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw))
    ys = np.arange(h) / cell
    xs = np.arange(w) / cell
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _background(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Textured RGB background (H x W x 3 float in 0..255): colour blobs, gratings, grain."""
    h, w = shape
    base = rng.uniform(60, 190, size=3)
    image = np.broadcast_to(base, (h, w, 3)).copy()
    for _ in range(3):
        colour = rng.uniform(-60, 60, size=3)
        image += _smooth_noise(rng, shape, cell=int(rng.integers(12, 40)))[..., None] * colour
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for _ in range(2):
        freq = rng.uniform(0.05, 0.25)
        angle = rng.uniform(0, math.pi)
        grating = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 6.3))
        image += grating[..., None] * rng.uniform(-20, 20, size=3)
    image += rng.normal(0, 6, size=(h, w, 1))
    return image


@dataclass
class _Object:
    start: np.ndarray  # centre (y, x) at t = 0
    end: np.ndarray  # centre at the last frame
    radii: np.ndarray  # (ry, rx)
    angle: float
    spin: float  # rotation per frame
    wobble: np.ndarray  # (amplitude y, amplitude x, frequency, phase)
    colour: np.ndarray  # RGB base colour
    stripe: np.ndarray  # (frequency u, frequency v, phase, contrast)
    spots: np.ndarray  # texture field in object coordinates, indexed by (v, u) + offset
    first_frame: int


def _make_objects(rng: np.random.Generator, shape: tuple[int, int], num_objects: int,
                  first_frames: SequenceType[int]) -> list[_Object]:
    h, w = shape
    slot = w / num_objects
    # Start in separate vertical slots, end in the reversed order: paths cross (occlusions),
    # while at t = 0 no two objects overlap (every object fully visible in the first frame).
    order = rng.permutation(num_objects)
    objects = []
    for k in range(num_objects):
        max_radius = 0.42 * min(slot, h) if num_objects > 1 else 0.3 * min(h, w)
        ry = rng.uniform(0.45, 0.8) * max_radius
        rx = rng.uniform(0.45, 0.8) * max_radius
        reach = max(ry, rx)
        start = np.array([rng.uniform(reach, h - reach), (order[k] + 0.5) * slot])
        end = np.array([rng.uniform(reach, h - reach), (num_objects - order[k] - 0.5) * slot])
        if num_objects == 1:
            end[1] = rng.uniform(reach, w - reach)
        objects.append(_Object(
            start=start, end=end, radii=np.array([ry, rx]),
            angle=rng.uniform(0, math.pi), spin=rng.uniform(-0.05, 0.05),
            wobble=np.array([rng.uniform(0, 0.06 * h), rng.uniform(0, 0.06 * w),
                             rng.uniform(0.1, 0.4), rng.uniform(0, 2 * math.pi)]),
            colour=rng.uniform(20, 235, size=3),
            stripe=np.array([rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.6), rng.uniform(0, 6.3),
                             rng.uniform(20, 45)]),
            spots=_smooth_noise(rng, (128, 128), cell=int(rng.integers(4, 10))),
            first_frame=int(first_frames[k]),
        ))
    return objects


def _object_pose(obj: _Object, t: int, num_frames: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Centre (y, x), angle and radii at frame t: eased motion plus a sinusoidal wobble."""
    s = t / max(1, num_frames - 1)
    s = 0.5 - 0.5 * math.cos(math.pi * s)  # ease in/out: smooth start and stop
    amp_y, amp_x, freq, phase = obj.wobble
    centre = obj.start + (obj.end - obj.start) * s
    centre = centre + np.array([amp_y * math.sin(freq * t + phase), amp_x * math.cos(freq * t + phase)])
    radii = obj.radii * (1.0 + 0.08 * math.sin(0.3 * t + phase))
    return centre, obj.angle + obj.spin * t, radii


def _stop_and_go_poses(rng: np.random.Generator, obj: _Object, num_frames: int, shape: tuple[int, int],
                       hold: tuple[float, float] = HOLD) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Per frame (centre (y, x), angle, radii) of a stop-and-go object: holds (lasting a fraction
    in [hold[0], hold[1]] of the sequence, at least 3 frames) drifting slowly, each followed by a dash of 2-4 frames (eased)
    to a random place at least 0.3 * width away, with a spin."""
    h, w = shape
    reach = float(max(obj.radii))
    lo = np.array([min(reach, h / 2), min(reach, w / 2)])
    hi = np.array([max(h - reach, h / 2), max(w - reach, w / 2)])
    poses = []
    pos, angle = obj.start.copy(), obj.angle
    while len(poses) < num_frames:
        drift = rng.uniform(-1.0, 1.0, size=2)
        drift *= rng.uniform(0.0, DRIFT_MAX) / max(1e-9, float(np.abs(drift).max()))
        for _ in range(int(rng.integers(max(3, int(hold[0] * num_frames)), max(4, int(hold[1] * num_frames)) + 1))):
            poses.append((pos.copy(), angle, obj.radii))
            pos = np.clip(pos + drift, lo, hi)
        candidates = rng.uniform(lo, hi, size=(8, 2))
        far = np.abs(candidates[:, 1] - pos[1]) >= 0.3 * w
        target = candidates[int(np.argmax(far))] if far.any() else \
            candidates[int(np.argmax(np.abs(candidates[:, 1] - pos[1])))]
        spin = rng.uniform(-0.6, 0.6)
        steps = int(rng.integers(2, 5))
        for i in range(1, steps + 1):
            s = 0.5 - 0.5 * math.cos(math.pi * i / steps)
            poses.append((pos + (target - pos) * s, angle + spin * s, obj.radii))
        pos, angle = target, angle + spin
    return poses[:num_frames]


def render_sequence(seed_sequence: SequenceType[int], num_frames: int, size: tuple[int, int],
                    num_objects: int, first_frames: Optional[SequenceType[int]] = None,
                    motion: str = "smooth", hold: tuple[float, float] = HOLD) -> tuple[np.ndarray, np.ndarray]:
    """Render one sequence: (frames uint8 T x H x W x 3 RGB, labels uint8 T x H x W).

    first_frames[k]: frame where object k+1 appears (default all 0); before it the object is
    not drawn. Labels: the id of the topmost object at each pixel, 0 for background.
    motion: "smooth" or "stop-and-go" (see the module docstring); hold: stop-and-go only, the
    shortest and longest hold as fractions of the sequence (longer holds: more still frames).
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}: use one of {', '.join(MOTIONS)}")
    rng = np.random.default_rng(list(seed_sequence))
    h, w = size
    first_frames = list(first_frames) if first_frames is not None else [0] * num_objects
    pad = max(8, int(0.15 * max(h, w)))
    background = _background(rng, (h + 2 * pad, w + 2 * pad))
    pan = rng.uniform(-1.0, 1.0, size=2) * pad / max(1, num_frames - 1)
    objects = _make_objects(rng, size, num_objects, first_frames)
    if motion == "stop-and-go":
        pan = np.zeros(2)
        mean = background.mean(axis=(0, 1))
        background = mean + CALM * (background - mean)
        path_rng = np.random.default_rng(list(seed_sequence) + [11])
        poses = [_stop_and_go_poses(path_rng, obj, num_frames, size, hold) for obj in objects]
    else:
        poses = [[_object_pose(obj, t, num_frames) for t in range(num_frames)] for obj in objects]

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = np.zeros((num_frames, h, w, 3), dtype=np.uint8)
    labels = np.zeros((num_frames, h, w), dtype=np.uint8)
    for t in range(num_frames):
        oy, ox = (pad + pan * t).round().astype(int)
        oy, ox = int(np.clip(oy, 0, 2 * pad)), int(np.clip(ox, 0, 2 * pad))
        image = background[oy:oy + h, ox:ox + w].copy()
        label = np.zeros((h, w), dtype=np.uint8)
        for obj_id, obj in enumerate(objects, start=1):
            if t < obj.first_frame:
                continue
            centre, angle, radii = poses[obj_id - 1][t]
            dy, dx = yy - centre[0], xx - centre[1]
            # Object coordinates: u along the first axis, v along the second.
            u = dx * math.cos(angle) + dy * math.sin(angle)
            v = -dx * math.sin(angle) + dy * math.cos(angle)
            inside = (u / radii[1]) ** 2 + (v / radii[0]) ** 2 <= 1.0
            if not inside.any():
                continue
            fu, fv, phase, contrast = obj.stripe
            stripes = np.sin(fu * u[inside] + phase) * np.sin(fv * v[inside])
            # The spot texture spans the object whatever its size.
            spot_v = np.clip((v[inside] / radii[0] * 63 + 64).astype(int), 0, 127)
            spot_u = np.clip((u[inside] / radii[1] * 63 + 64).astype(int), 0, 127)
            texture = contrast * stripes + 30 * obj.spots[spot_v, spot_u]
            image[inside] = obj.colour + texture[:, None] * np.array([1.0, 0.8, 0.6])
            label[inside] = obj_id
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)
        labels[t] = label
    return frames, labels


# ---------------------------------------------------------------------------------------------
# Writing


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=92)
    atomic_write_bytes(path, buffer.getvalue())


def _write_lines(path: Path, lines: SequenceType[str]) -> None:
    make_dirs(path.parent)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _write_json(path: Path, data: dict) -> None:
    make_dirs(path.parent)
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def make_davis_like(root: str | Path, num_sequences: int = 3, num_frames: int = 12,
                    size: tuple[int, int] = (120, 216), num_objects: int = 2, seed: int = 0,
                    num_train_sequences: int = 2, motion: str = "smooth", hold: tuple[float, float] = HOLD
                    ) -> list[str]:
    """Write a DAVIS-layout data set under root and return the names of its val sequences.

    Writes JPEGImages/480p/<seq>/%05d.jpg, Annotations/480p/<seq>/%05d.png (every frame),
    ImageSets/2017/{train,val}.txt and ImageSets/2016/{train,val}.txt. All objects are in
    the first frame. Val sequences are synth-val-NN, train sequences synth-train-NN.
    motion, hold: as render_sequence.
    """
    root = Path(root)
    splits = {"val": [f"synth-val-{i:02d}" for i in range(num_sequences)],
              "train": [f"synth-train-{i:02d}" for i in range(num_train_sequences)]}
    for split_code, (split, names) in enumerate(splits.items()):
        for index, name in enumerate(names):
            frames, labels = render_sequence((seed, 1, split_code, index), num_frames, size, num_objects,
                                             motion=motion, hold=hold)
            image_dir = root / "JPEGImages" / "480p" / name
            anno_dir = root / "Annotations" / "480p" / name
            make_dirs(image_dir)
            make_dirs(anno_dir)
            for t in range(num_frames):
                _write_jpeg(image_dir / f"{t:05d}.jpg", frames[t])
                write_label_png(anno_dir / f"{t:05d}.png", labels[t])
        for year in ("2016", "2017"):
            _write_lines(root / "ImageSets" / year / f"{split}.txt", names)
    return splits["val"]


def _late_start(rng: np.random.Generator, num_frames: int) -> int:
    """A frame index, multiple of YTVOS_STEP, after 0 and early enough that the every-5th-frame
    splits still have a frame to score the object on (before the second-to-last annotated one)."""
    annotated = list(range(0, num_frames, YTVOS_STEP))
    choices = annotated[1:-2] or annotated[1:-1] or annotated[1:]
    if not choices:
        raise ValueError(f"{num_frames} frames are too few for an object entering later in the "
                         f"YouTube-VOS layout (need at least {YTVOS_STEP + 1})")
    return int(rng.choice(choices))


def make_ytvos_like(root: str | Path, num_sequences: int = 3, num_frames: int = 26,
                    size: tuple[int, int] = (120, 216), num_objects: int = 2, seed: int = 0,
                    num_train_sequences: int = 2, motion: str = "smooth") -> dict[str, list[str]]:
    """Write a YouTube-VOS-2018-layout data set under root; return video ids per list.

    * train_all_frames/JPEGImages: every frame; train/JPEGImages, train/Annotations: every
      5th frame, all objects; train/meta.json. The train videos are listed in
      root/ytvos_jjvalid.txt (num_sequences videos) and root/ytvos_jjtrain.txt
      (num_train_sequences videos): pass one as YouTubeVOSDataset(split_file=...).
    * valid_all_frames/JPEGImages: every frame; valid/JPEGImages: every 5th frame;
      valid/Annotations: only each object's first frame, holding the objects starting there;
      valid/meta.json.
    The last object of every video enters at a later annotated frame. motion: "smooth" or
    "stop-and-go" (module docstring).
    Returns {"jjval": [...], "jjtrain": [...], "valid": [...]}.
    """
    root = Path(root)
    if num_frames < 1:
        raise ValueError("num_frames must be positive")
    lists = {"jjval": [f"synthjv{i:03d}" for i in range(num_sequences)],
             "jjtrain": [f"synthjt{i:03d}" for i in range(num_train_sequences)],
             "valid": [f"synthva{i:03d}" for i in range(num_sequences)]}
    metas: dict[str, dict] = {"train": {}, "valid": {}}
    for list_code, (list_name, videos) in enumerate(lists.items()):
        part = "valid" if list_name == "valid" else "train"
        for index, video in enumerate(videos):
            seeds = (seed, 2, list_code, index)
            first_frames = [0] * num_objects
            if num_objects > 1:
                first_frames[-1] = _late_start(np.random.default_rng(list(seeds) + [7]), num_frames)
            frames, labels = render_sequence(seeds, num_frames, size, num_objects, first_frames, motion=motion)
            objects = _write_ytvos_video(root, part, video, frames, labels, first_frames)
            metas[part][video] = {"objects": objects}
    for part, videos in metas.items():
        _write_json(root / part / "meta.json", {"videos": videos})
    _write_lines(root / "ytvos_jjvalid.txt", lists["jjval"])
    _write_lines(root / "ytvos_jjtrain.txt", lists["jjtrain"])
    return lists


def _write_ytvos_video(root: Path, part: str, video: str, frames: np.ndarray, labels: np.ndarray,
                       first_frames: SequenceType[int]) -> dict:
    all_dir = root / f"{part}_all_frames" / "JPEGImages" / video
    sub_dir = root / part / "JPEGImages" / video
    anno_dir = root / part / "Annotations" / video
    for d in (all_dir, sub_dir, anno_dir):
        make_dirs(d)
    annotated = list(range(0, len(frames), YTVOS_STEP))
    for t in range(len(frames)):
        _write_jpeg(all_dir / f"{t:05d}.jpg", frames[t])
        if t in annotated:
            _write_jpeg(sub_dir / f"{t:05d}.jpg", frames[t])

    objects = {}
    for k, first in enumerate(first_frames):
        obj_id = k + 1
        present = [t for t in annotated if (labels[t] == obj_id).any()]
        if not present or present[0] != first:
            raise RuntimeError(f"synthetic object {obj_id} of {video} is not visible at its first "
                               f"frame {first}; try another seed")
        objects[str(obj_id)] = {"category": "blob", "frames": [f"{t:05d}" for t in present]}

    if part == "train":
        for t in annotated:
            write_label_png(anno_dir / f"{t:05d}.png", labels[t])
    else:
        # valid: one annotation per frame where objects start, holding only those objects.
        for first in sorted(set(first_frames)):
            starting = [k + 1 for k, f in enumerate(first_frames) if f == first]
            write_label_png(anno_dir / f"{first:05d}.png",
                            np.where(np.isin(labels[first], starting), labels[first], 0).astype(np.uint8))
    return objects
