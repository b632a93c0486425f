"""Overlays of segmentation masks on frames (MP4 / GIF) and the per-frame reuse timeline.

* `overlay(image, labels)`: each object's pixels alpha-blended with its DAVIS palette colour
  (id k -> DAVIS_PALETTE[k]), its boundary drawn in the pure palette colour.
* `Mp4Writer`: cv2.VideoWriter with the 'mp4v' codec. mp4v drops an odd last row/column, so
  odd sizes are padded (edge pixels repeated) to even ones.
* `GifWriter`: PIL, optimized, frames scaled down to at most `max_width` pixels wide (427, like
  the upstream sample GIFs); more than `max_frames` frames are subsampled evenly (every 2nd,
  4th, ... frame, the frame time multiplied accordingly), so the file stays small.
* Reuse timeline: `timeline.json` is {"fps": float, "frames": [{"frame": "00000", "reused":
  {"1": true, ...}, "reuse_prob": {"1": 0.83, ...}}, ...]}, "reused" holding the objects tracked
  in that frame, "reuse_prob" the gate's reuse probability where it ran (absent in older files). `draw_timeline`
  draws one row per object and one cell per frame: reused (green), computed (red), the object's
  first frame where its mask is given (blue: the frame just before its first tracked frame), and
  not started (light grey); legend, and a title with the FPS and the reuse rate.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evaluation.results import TrackingStats, load_timeline, percent
from lib.errors import UsageError
from lib.fileio import atomic_write_bytes, make_dirs
from lib.image_io import read_image, read_label_png, resize_image_area, resize_labels_nearest_exact
from lib.palette import DAVIS_PALETTE
from lib.video_io import FRAME_SUFFIXES, natural_key, same_aspect

GIF_MAX_WIDTH = 427
GIF_MAX_FRAMES = 200

# ---------------------------------------------------------------------------------------------
# Overlays


def contour_width_for(size: Sequence[int]) -> int:
    """Boundary thickness in pixels for a frame of size (H, W): 1 up to 480p, then growing."""
    return max(1, int(round(min(size[0], size[1]) / 480)))


def object_boundaries(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Bool H x W: object pixels (label > 0) within `width` pixels of a pixel with another label
    (background, another object, or the image border does not count)."""
    labels = np.asarray(labels)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    # A pixel is interior when the max and the min of its neighbourhood both equal its label.
    lo = cv2.erode(labels, kernel, borderType=cv2.BORDER_REPLICATE)
    hi = cv2.dilate(labels, kernel, borderType=cv2.BORDER_REPLICATE)
    return (labels > 0) & ((lo != labels) | (hi != labels))


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, contour: bool = True,
            contour_width: Optional[int] = None) -> np.ndarray:
    """Frame (RGB uint8 H x W x 3) with the objects of `labels` (uint8 H x W ids) drawn over it.

    Object pixels become (1 - alpha) * frame + alpha * palette colour (rounded); with `contour`,
    boundary pixels get the palette colour itself. Background pixels are unchanged.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlay needs an RGB uint8 H x W x 3 frame, got {image.dtype} {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and frame {image.shape[:2]} differ in size")
    labels = labels.astype(np.uint8, copy=False)
    colours = DAVIS_PALETTE[labels]  # H x W x 3
    fg = labels > 0
    out = image.copy()
    blend = (1.0 - alpha) * image[fg].astype(np.float32) + alpha * colours[fg].astype(np.float32)
    out[fg] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    if contour:
        edge = object_boundaries(labels, contour_width or contour_width_for(labels.shape))
        out[edge] = colours[edge]
    return out


class Mp4Writer:
    """Frames (RGB uint8 H x W x 3, all one size) to an MP4 with cv2's 'mp4v' codec. Opened at
    the first frame; odd sizes padded to even (edge pixels repeated). Use as a context manager."""

    def __init__(self, path: str | os.PathLike, fps: float = 10.0):
        self.path = Path(path)
        self.fps = float(fps)
        self._writer: Optional[cv2.VideoWriter] = None
        self._size: Optional[tuple[int, int]] = None
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        if self._writer is None:
            self._size = (h, w)
            make_dirs(self.path.parent)
            padded = (h + h % 2, w + w % 2)
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                           (padded[1], padded[0]))
            if not self._writer.isOpened():
                self._writer = None
                raise UsageError(f"cannot open {self.path} for writing an MP4 (cv2 'mp4v' codec)")
        elif (h, w) != self._size:
            raise ValueError(f"frame size {w}x{h} differs from the first frame's "
                             f"{self._size[1]}x{self._size[0]} ({self.path})")
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        if h % 2 or w % 2:
            bgr = cv2.copyMakeBorder(bgr, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        self._writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GifWriter:
    """Frames to an optimized looping GIF, at most `max_width` wide and `max_frames` long (longer
    inputs keep every 2nd, 4th, ... frame, shown proportionally longer). Written at close()."""

    def __init__(self, path: str | os.PathLike, fps: float = 10.0, max_width: int = GIF_MAX_WIDTH,
                 max_frames: Optional[int] = GIF_MAX_FRAMES):
        self.path = Path(path)
        self.fps = float(fps)
        self.max_width = int(max_width)
        self.max_frames = max_frames
        self.stride = 1
        self._seen = 0
        self._frames: list[Image.Image] = []

    def add(self, rgb: np.ndarray) -> None:
        index = self._seen
        self._seen += 1
        if index % self.stride:
            return
        h, w = rgb.shape[:2]
        if w > self.max_width:
            rgb = resize_image_area(rgb, (max(1, int(round(h * self.max_width / w))), self.max_width))
        self._frames.append(Image.fromarray(np.ascontiguousarray(rgb)).quantize(
            256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE))
        if self.max_frames and len(self._frames) > self.max_frames:
            self._frames = self._frames[::2]
            self.stride *= 2

    def close(self) -> None:
        if not self._frames:
            return
        buffer = io.BytesIO()
        duration = int(round(1000.0 * self.stride / self.fps))
        first, rest = self._frames[0], self._frames[1:]
        first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=max(duration, 20),
                   loop=0, optimize=True, disposal=1)
        make_dirs(self.path.parent)
        atomic_write_bytes(self.path, buffer.getvalue())
        self._frames = []

    def __enter__(self) -> "GifWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


# ---------------------------------------------------------------------------------------------
# Reuse timeline

ABSENT, GIVEN, COMPUTED, REUSED = 0, 1, 2, 3
STATE_NAMES = {REUSED: "reused", COMPUTED: "computed", GIVEN: "first frame (mask given)",
               ABSENT: "not started"}
TIMELINE_COLOURS = {
    REUSED: (44, 160, 44),
    COMPUTED: (214, 39, 40),
    GIVEN: (31, 119, 180),
    ABSENT: (222, 222, 222),
}
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def timeline_states(frames: Sequence[Mapping]) -> tuple[list[int], np.ndarray]:
    """(object ids, states uint8 num_objects x num_frames) with ABSENT / GIVEN / COMPUTED / REUSED.

    An object's mask is given on the frame before its first tracked frame (the tracker tracks an
    object from the frame after the one where it starts); earlier frames are ABSENT.
    """
    ids = sorted({int(k) for f in frames for k in f["reused"]})
    states = np.full((len(ids), len(frames)), ABSENT, dtype=np.uint8)
    row = {obj_id: r for r, obj_id in enumerate(ids)}
    for t, f in enumerate(frames):
        for k, v in f["reused"].items():
            states[row[int(k)], t] = REUSED if v else COMPUTED
    for r in range(len(ids)):
        tracked = np.flatnonzero(states[r] != ABSENT)
        if tracked.size and tracked[0] > 0:
            states[r, tracked[0] - 1] = GIVEN
    return ids, states


@dataclass
class TimelineLayout:
    """Geometry of a timeline image: cell (r, t) spans x in [left + t * cell_w, left + (t + 1) *
    cell_w - gap), y in [top + r * row_h, top + r * row_h + cell_h)."""

    width: int
    height: int
    left: int
    top: int
    cell_w: int
    cell_h: int
    row_h: int
    gap: int

    def cell_centre(self, row: int, frame: int) -> tuple[int, int]:
        """(x, y) of the centre of a cell's coloured part."""
        x = self.left + frame * self.cell_w + (self.cell_w - self.gap) // 2
        y = self.top + row * self.row_h + self.cell_h // 2
        return x, y


TITLE_H, AXIS_H, LEGEND_H, LEFT, RIGHT = 48, 24, 30, 76, 16
MIN_WIDTH = 600
PLOT_WIDTH = 960


def timeline_layout(num_frames: int, num_objects: int) -> TimelineLayout:
    """Layout for num_frames cells per row: cells 1..24 px wide, filling about 960 px."""
    cell_w = max(1, min(24, PLOT_WIDTH // max(1, num_frames)))
    gap = 1 if cell_w >= 4 else 0
    cell_h, row_h = 22, 26
    width = max(MIN_WIDTH, LEFT + num_frames * cell_w + RIGHT)
    height = TITLE_H + max(1, num_objects) * row_h + AXIS_H + LEGEND_H
    return TimelineLayout(width, height, LEFT, TITLE_H, cell_w, cell_h, row_h, gap)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _tick_step(num_frames: int, cell_w: int, min_px: int = 48) -> int:
    for base in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if base * cell_w >= min_px:
            return base
    return max(1, num_frames)


def draw_timeline(timeline: Mapping, name: str = "") -> Image.Image:
    """RGB image of a timeline (the dict of a timeline.json): one row per object (labelled with
    its id and palette colour), one cell per frame, frame-number axis, legend, and the title
    "<name>: <fps> FPS, reuse <rate>% (<reused>/<tracked> object-frames)"."""
    frames = list(timeline["frames"])
    ids, states = timeline_states(frames)
    layout = timeline_layout(len(frames), len(ids))
    image = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(11)

    stats = TrackingStats.from_timeline(frames)
    reused, tracked = stats.reused, stats.tracked
    fps = timeline.get("fps")
    fps_text = f"{fps:.1f} FPS" if isinstance(fps, (int, float)) and math.isfinite(fps) else "FPS n/a"
    rate_text = f"reuse {percent(stats.reuse_rate)} ({reused}/{tracked} object-frames)" if tracked \
        else "reuse n/a (no tracked object-frames)"
    title = f"{name}: " if name else ""
    draw.text((8, 6), f"{title}{fps_text}, {rate_text}", fill=TEXT, font=font)
    draw.text((8, 26), f"{len(frames)} frames, {len(ids)} object{'s' if len(ids) != 1 else ''}; "
                       f"a cell per frame, a row per object", fill=(90, 90, 90), font=small)

    for r, obj_id in enumerate(ids):
        y0 = layout.top + r * layout.row_h
        swatch = tuple(int(c) for c in DAVIS_PALETTE[obj_id])
        draw.rectangle([6, y0 + 5, 17, y0 + 16], fill=swatch, outline=TEXT)
        draw.text((22, y0 + 4), f"obj {obj_id}", fill=TEXT, font=small)
        for t in range(len(frames)):
            x0 = layout.left + t * layout.cell_w
            draw.rectangle([x0, y0, x0 + layout.cell_w - layout.gap - 1, y0 + layout.cell_h - 1],
                           fill=TIMELINE_COLOURS[int(states[r, t])])

    axis_y = layout.top + max(1, len(ids)) * layout.row_h
    if not ids:
        draw.text((layout.left, layout.top + 4), "no object tracked", fill=TEXT, font=small)
    step = _tick_step(len(frames), layout.cell_w)
    for t in range(0, len(frames), step):
        x = layout.left + t * layout.cell_w + (layout.cell_w - layout.gap) // 2
        draw.line([x, axis_y, x, axis_y + 3], fill=TEXT)
        draw.text((x - 3, axis_y + 5), str(t), fill=TEXT, font=small)

    x = 8
    legend_y = axis_y + AXIS_H + 6
    for state in (REUSED, COMPUTED, GIVEN, ABSENT):
        draw.rectangle([x, legend_y, x + 13, legend_y + 13], fill=TIMELINE_COLOURS[state], outline=TEXT)
        label = STATE_NAMES[state]
        draw.text((x + 18, legend_y), label, fill=TEXT, font=small)
        x += 18 + int(draw.textlength(label, font=small)) + 18
    return image


def save_timeline_png(path: str | os.PathLike, timeline: Mapping, name: str = "") -> None:
    buffer = io.BytesIO()
    draw_timeline(timeline, name).save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(Path(path), buffer.getvalue())


def write_overlays(frames: Iterable[tuple[np.ndarray, np.ndarray]], mp4_path: Optional[Path],
                   gif_path: Optional[Path], fps: float = 10.0, alpha: float = 0.5,
                   gif_max_width: int = GIF_MAX_WIDTH) -> int:
    """Overlay every (frame, labels) pair and write them to mp4_path and/or gif_path (None skips).
    Returns the number of frames."""
    count = 0
    mp4 = Mp4Writer(mp4_path, fps) if mp4_path is not None else None
    gif = GifWriter(gif_path, fps, gif_max_width) if gif_path is not None else None
    try:
        for image, labels in frames:
            shown = overlay(image, labels, alpha)
            if mp4 is not None:
                mp4.write(shown)
            if gif is not None:
                gif.add(shown)
            count += 1
        if gif is not None:
            gif.close()
    finally:
        if mp4 is not None:
            mp4.close()
    return count


# ---------------------------------------------------------------------------------------------
# The threshold sweep's curve (evaluate.py --TH 1.0,0.9,...; visualize.py curve)


def save_curve_png(path: str | os.PathLike, curves: Sequence[tuple[str, Sequence[Mapping]]], title: str = "") -> None:
    """J&F against tracker FPS and against GFLOPs per frame, side by side, one line per curve
    (label, rows of curve.csv: "tau", "J&F", "fps", "gflops_per_frame", "reuse_rate"). Each
    point is labelled with its tau and reuse rate; dashed lines mark tau = 1.0 (always compute)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    panels = (("fps", "tracker speed (frames per second)"), ("gflops_per_frame", "GFLOPs per frame"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, rows) in enumerate(curves):
        colour = colours[k % len(colours)]
        points = sorted((r for r in rows if r.get("J&F") is not None), key=lambda r: -r["tau"])
        for ax, (key, _) in zip(axes, panels):
            xs = [r[key] for r in points]
            ys = [100 * r["J&F"] for r in points]
            ax.plot(xs, ys, "-o", color=colour, label=label, zorder=3)
            for r, x, y in zip(points, xs, ys):
                reuse = r.get("reuse_rate") if r.get("reuse_rate") is not None else math.nan
                text = f"τ={float(r['tau'])!r}" + (f"\n{100 * reuse:.0f}% reused" if reuse == reuse else "")
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8, color=colour,
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.8}, zorder=4)
            plain = [r for r in points if r["tau"] == 1.0]
            if plain:
                ax.axhline(100 * plain[0]["J&F"], color=colour, linestyle="--", linewidth=1, alpha=0.7, zorder=1)
                ax.axvline(plain[0][key], color=colour, linestyle="--", linewidth=1, alpha=0.7, zorder=1)
    for ax, (_, xlabel) in zip(axes, panels):
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.15, y=0.15)
    axes[0].set_ylabel("J&F (%)")
    axes[0].plot([], [], "--", color="grey", label="τ = 1.0 (always compute)")
    axes[0].legend(loc="best", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    make_dirs(Path(path).parent, "the curve's folder")
    atomic_write_bytes(Path(path), buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# A results directory's overlays and timelines (visualize.py)


def _mask_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"
             and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def list_sequences(results: Path, skip: Optional[Path] = None) -> list[str]:
    """Folders of `results` that hold label PNGs, sorted (the output folder excluded)."""
    skip_resolved = skip.resolve() if skip is not None else None
    names = []
    for d in results.iterdir():
        if not d.is_dir() or d.name.startswith("."):
            continue
        if skip_resolved is not None and d.resolve() == skip_resolved:
            continue
        if _mask_files(d):
            names.append(d.name)
    return sorted(names, key=natural_key)


def _frame_path(frames: Path, seq: str, stem: str) -> Path:
    for suffix in FRAME_SUFFIXES:
        path = frames / seq / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"--frames: no frame {frames / seq / stem}.jpg (or .jpeg / .png / .bmp) for the "
                            f"result mask {seq}/{stem}.png")


def _pairs(results: Path, frames: Path, seq: str):
    for mask_path in _mask_files(results / seq):
        image = read_image(_frame_path(frames, seq, mask_path.stem))
        labels = read_label_png(mask_path)
        if labels.shape != image.shape[:2]:
            if not same_aspect(labels.shape, image.shape[:2]):
                raise UsageError(f"--results: mask {mask_path} is {labels.shape[1]}x{labels.shape[0]} but its "
                                 f"frame is {image.shape[1]}x{image.shape[0]} (another resolution of the frames?)")
            labels = resize_labels_nearest_exact(labels, image.shape[:2])
        yield image, labels


def write_visuals(results: str | os.PathLike, frames: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                  sequences: Optional[Sequence[str]] = None, *, mp4: bool = True, gif: bool = True,
                  timeline: bool = True, fps_out: float = 10.0, alpha: float = 0.5,
                  gif_width: int = GIF_MAX_WIDTH) -> dict[str, list[str]]:
    """Overlays (<out>/<seq>/overlay.mp4 / .gif) and reuse timelines (<out>/<seq>/timeline.png)
    of a results directory (<seq>/<frame>.png label PNGs, <seq>/timeline.json), frames read from
    <frames>/<seq>/; out defaults to <results>/vis, sequences to every folder holding PNGs.
    Returns {seq: [written paths]}; FileNotFoundError / UsageError name the argument at fault."""
    results, frames = Path(results), Path(frames)
    if not results.is_dir():
        raise FileNotFoundError(f"--results: no such directory: {results}")
    if not frames.is_dir():
        raise FileNotFoundError(f"--frames: no such directory: {frames}")
    out = Path(out) if out is not None else results / "vis"
    if out.resolve() == results.resolve() or (out.is_dir() and _mask_files(out)):
        raise UsageError(f"--out {out} must not be the results directory or a folder of label PNGs "
                         f"(its outputs would be taken for results)")
    if sequences:
        sequences = list(sequences)
        for seq in sequences:
            if not (results / seq).is_dir():
                raise FileNotFoundError(f"--sequences: no results for {seq!r} ({results / seq} does not exist)")
            if not _mask_files(results / seq):
                raise UsageError(f"--sequences: {results / seq} holds no label PNGs")
    else:
        sequences = list_sequences(results, skip=out)
        if not sequences:
            raise UsageError(f"--results: {results} has no <seq>/ folder holding label PNGs")
    for seq in sequences:
        if not (frames / seq).is_dir():
            raise FileNotFoundError(f"--frames: no frame folder {frames / seq} for sequence {seq}")

    written: dict[str, list[str]] = {}
    for seq in sequences:
        target = out / seq
        make_dirs(target, "the overlay folder", "--out")
        paths = []
        mp4_path = target / "overlay.mp4" if mp4 else None
        gif_path = target / "overlay.gif" if gif else None
        if mp4_path is not None or gif_path is not None:
            count = write_overlays(_pairs(results, frames, seq), mp4_path, gif_path, fps_out, alpha, gif_width)
            paths += [str(p) for p in (mp4_path, gif_path) if p is not None]
        else:
            count = len(_mask_files(results / seq))
        timeline_json = results / seq / "timeline.json"
        if timeline and timeline_json.is_file():
            save_timeline_png(target / "timeline.png", load_timeline(timeline_json), seq)
            paths.append(str(target / "timeline.png"))
        written[seq] = paths
        print(f"{seq}: {count} frames -> {', '.join(paths) if paths else 'nothing (all outputs off)'}")
    return written

