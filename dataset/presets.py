"""Evaluation presets (`evaluate.py --dset NAME`): one small class per benchmark family.

Each preset knows its layout, the flag / environment variable of its root, which frames are
scored (and by which protocol) and, for benchmarks without public ground truth, the layout of
the evaluation server's zip. `PRESETS[name].load(args)` checks the whole input before anything
is tracked and returns an `EvalData`.

Layouts (see docs/evaluation.md, "Presets"):

    dv2016val, dv2017val, dv2017testdev   DAVIS: JPEGImages/480p/<seq>/, Annotations/480p/<seq>/,
                                          ImageSets/<year>/{val,test-dev}.txt
    yt2018*, yt2019val, yt2019valAll      YouTube-VOS: train/, train_all_frames/, valid/, valid_all_frames/
    mose-val, mose-train                  MOSE: <root>/{valid,train}/{JPEGImages,Annotations}/<video>/
    lvos-val                              LVOS v1/v2: <root>/valid/{JPEGImages,Annotations}/<video>/ and
                                          the meta JSON of per-object frame ranges
    davis-layout, ytvos-layout            any folder in one of the two layouts (--data-root)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dataset.davis import DAVISDataset, list_davis_sequences, resolve_davis_root
from dataset.sequence import VOID_LABEL, Sequence, folder_listing, list_frames, resolve_root
from dataset.ytvos import SPLITS_DIR, YouTubeVOSDataset, read_sequence_list, resolve_ytvos_root, valid_frame_names
from lib.metrics import LVOS_STEP, lvos_scored_positions
from lib.errors import UsageError
from lib.image_io import read_label_png

# Zip layouts of the evaluation servers: member name of <video>/<frame>.png.
ZIP_YTVOS = "Annotations/"  # YouTube-VOS (and LVOS test): Annotations/<video>/<frame>.png
ZIP_DAVIS = ""  # DAVIS test-dev and MOSE: <video>/<frame>.png at the top of the zip
LVOS_UNSEEN = SPLITS_DIR / "lvos_unseen_videos.txt"


@dataclass
class LvosRange:
    """An object's frame range from the LVOS meta JSON: of frames start, start+5, ... < end,
    lib.metrics.lvos_scored_positions are scored; `length` is the meta "frame_nums"."""
    start: int
    end: int
    length: int


@dataclass
class EvalData:
    """What evaluating a preset needs.

    metric: "davis" (J&F by the DAVIS protocol), "lvos" (LVOS's protocol) or None (no ground
    truth: a submission zip). eval_frames: sequence -> the frames J&F is computed on (None:
    every frame). submission_prefix: zip member prefix (ZIP_YTVOS / ZIP_DAVIS) or None for no
    zip; submission_videos: video -> the frames the server expects. lvos_ranges: sequence ->
    object id -> LvosRange; lvos_unseen: the
    videos LVOS scores as unseen (read_lvos_unseen).
    """
    dset: str
    name: str
    root: Path
    sequences: list[Sequence]
    metric: Optional[str]
    eval_frames: dict[str, Optional[list[str]]] = field(default_factory=dict)
    submission_prefix: Optional[str] = None
    submission_videos: dict[str, list[str]] = field(default_factory=dict)
    lvos_ranges: dict[str, dict[int, LvosRange]] = field(default_factory=dict)
    lvos_unseen: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Helpers


def requested_sequences(args) -> Optional[list[str]]:
    """--sequences as a de-duplicated list (space or comma separated), None when not given."""
    if not getattr(args, "sequences", None):
        return None
    names = [n.strip() for item in args.sequences for n in item.split(",") if n.strip()]
    return list(dict.fromkeys(names)) or None


def select_sequences(requested: Optional[list[str]], names: list[str], where: str) -> list[str]:
    """The requested names among `names` (all when None), in the order of `names`."""
    if not names:
        raise UsageError(f"no sequences listed in {where}")
    if requested is None:
        return names
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise UsageError(f"--sequences: {', '.join(unknown)} not in {where} "
                         f"({len(names)} sequences, e.g. {', '.join(names[:3])})")
    return [n for n in names if n in set(requested)]


def _require_dirs(root: Path, subdirs: list[str], flag: str, layout: str) -> None:
    """FileNotFoundError saying what was expected and what was found when a subdir is missing."""
    for sub in subdirs:
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} ({flag}) does not have the {layout} layout: expected {root / sub}/, "
                                    f"found {folder_listing(root)}")


def _annotations(anno_dir: Path, images: list[Path]) -> dict[str, Path]:
    stems = {p.stem for p in images}
    return {p.stem: p for p in sorted(anno_dir.glob("*.png")) if p.stem in stems}


def _object_starts(name: str, images: list[Path], annotations: dict[str, Path]) -> dict[int, str]:
    """Object id -> the first annotated frame holding it (frame order)."""
    starts: dict[int, str] = {}
    for image in images:
        path = annotations.get(image.stem)
        if path is None:
            continue
        labels = read_label_png(path)
        for obj_id in np.unique(labels).tolist():
            if obj_id not in (0, VOID_LABEL) and obj_id not in starts:
                starts[int(obj_id)] = image.stem
    if not starts:
        where = annotations[images[0].stem] if images[0].stem in annotations else \
            (next(iter(annotations.values())).parent if annotations else None)
        raise UsageError(f"video {name!r} has no first mask: no label PNG with an object"
                         f"{f' in {where}' if where else ' (no annotation PNG named like its frames)'}")
    return starts


def _first_frame_sequence(name: str, image_dir: Path, anno_dir: Path, dataset: str, expected: str) -> Sequence:
    """A sequence whose objects all start in the first frame (MOSE); expected: the layout, for
    errors."""
    images = list_frames(image_dir, expected)
    first = anno_dir / f"{images[0].stem}.png"
    if not first.is_file():
        raise FileNotFoundError(f"video {name!r} has no first mask: {first} not found")
    labels = read_label_png(first)
    obj_ids = [int(i) for i in np.unique(labels) if i not in (0, VOID_LABEL)]
    if not obj_ids:
        raise UsageError(f"video {name!r} has no first mask: {first} holds no object (all pixels background)")
    return Sequence(name, images, _annotations(anno_dir, images), {i: images[0].stem for i in obj_ids},
                    dataset=dataset)


def _all_annotated(sequences: list[Sequence]) -> bool:
    return all(f in s.annotation_paths for s in sequences for f in s.frame_names)


# ---------------------------------------------------------------------------------------------
# Presets


class Preset:
    """Base of the presets: `name`, `help`, `ground_truth` (whether its frames have public ground
    truth, so that J&F can be computed here) and load(args) -> EvalData."""

    name = ""
    help = ""
    ground_truth = True

    def load(self, args) -> EvalData:
        raise NotImplementedError


class DavisPreset(Preset):
    """DAVIS 2016/2017 val (J&F) and 2017 test-dev (first-frame masks only: server zip)."""

    def __init__(self, name: str, year: str, split: str, help: str):
        self.name, self.year, self.split, self.help = name, year, split, help
        self.ground_truth = split != "test-dev"

    def load(self, args) -> EvalData:
        root = resolve_davis_root(args.davis_root)
        imageset = root / "ImageSets" / self.year / f"{self.split}.txt"
        names = select_sequences(requested_sequences(args), list_davis_sequences(root, self.year, self.split),
                                 str(imageset))
        dataset = DAVISDataset(root, self.year, self.split, sequences=names)
        sequences = [dataset.sequence(n) for n in dataset.sequence_names]
        if self.split == "test-dev":
            return EvalData(self.name, dataset.name, root, sequences, None, submission_prefix=ZIP_DAVIS,
                            submission_videos={s.name: s.frame_names for s in sequences})
        return EvalData(self.name, dataset.name, root, sequences, "davis")


class YouTubeVOSPreset(Preset):
    """YouTube-VOS 2018 / 2019: upstream's held-out train videos (J&F) or valid (server zip)."""

    def __init__(self, name: str, split: str, year: str, help: str):
        self.name, self.split, self.year, self.help = name, split, year, help
        self.ground_truth = not split.startswith("valid")

    def load(self, args) -> EvalData:
        root = resolve_ytvos_root(args.ytvos_root)
        split_file = args.split_file
        if split_file is not None and not Path(split_file).expanduser().is_file():
            raise FileNotFoundError(f"--split-file {split_file} not found")
        full = YouTubeVOSDataset(root, self.split, split_file=split_file, year=self.year)
        requested = requested_sequences(args)
        where = str(split_file) if split_file else f"the YouTube-VOS {self.split} video list"
        names = select_sequences(requested, full.sequence_names, where)
        dataset = full if requested is None else YouTubeVOSDataset(root, self.split, sequences=names,
                                                                   split_file=split_file, year=self.year)
        sequences = [dataset.sequence(n) for n in dataset.sequence_names]
        name = f"ytvos{self.year}{self.split}"
        if self.split.startswith("valid"):
            videos = {v: valid_frame_names(root, v) for v in full.sequence_names}
            for seq in sequences:
                missing = [f for f in videos.get(seq.name, []) if f not in seq.frame_names]
                if missing:
                    raise FileNotFoundError(f"valid frame {missing[0]!r} of {seq.name!r} has no image in "
                                            f"{seq.image_paths[0].parent}")
            return EvalData(self.name, name, root, sequences, None, submission_prefix=ZIP_YTVOS,
                            submission_videos=videos)
        eval_frames: dict[str, Optional[list[str]]] = {}
        if self.split == "jjval_all_frames":  # scored on the annotated every-5th frames
            annotated = YouTubeVOSDataset(root, "jjval", sequences=names, split_file=split_file, year=self.year)
            for seq in sequences:
                frames = annotated.sequence(seq.name).frame_names
                extra = [f for f in frames if f not in seq.frame_names]
                if extra:
                    raise FileNotFoundError(f"annotated frame {extra[0]!r} of {seq.name!r} has no image in "
                                            f"{seq.image_paths[0].parent}")
                eval_frames[seq.name] = frames
        return EvalData(self.name, name, root, sequences, "davis", eval_frames=eval_frames)


class MosePreset(Preset):
    """MOSE: <root>/<split>/{JPEGImages,Annotations}/<video>/, no ImageSets (the folders are
    listed). valid: first-frame masks only, server zip; train: every frame annotated, J&F."""

    def __init__(self, name: str, split: str, help: str):
        self.name, self.split, self.help = name, split, help
        self.ground_truth = split == "train"

    def load(self, args) -> EvalData:
        root = resolve_root(args.mose_root, "MOSE", "MOSE_ROOT", "set the MOSE root with --mose-root or the MOSE_ROOT environment variable")
        _require_dirs(root, [f"{self.split}/JPEGImages", f"{self.split}/Annotations"], "--mose-root", "MOSE")
        image_root, anno_root = root / self.split / "JPEGImages", root / self.split / "Annotations"
        listed = sorted(p.name for p in image_root.iterdir() if p.is_dir())
        names = select_sequences(requested_sequences(args), listed, str(image_root))
        missing = [n for n in names if not (anno_root / n).is_dir()]
        if missing:
            raise FileNotFoundError(f"video {missing[0]!r} has no first mask: {anno_root / missing[0]} not found")
        sequences = [_first_frame_sequence(n, image_root / n, anno_root / n, f"mose-{self.split}",
                                           f"the MOSE layout {self.split}/JPEGImages/<video>/<frame>.jpg")
                     for n in names]
        if self.split == "valid":
            return EvalData(self.name, "mose-valid", root, sequences, None, submission_prefix=ZIP_DAVIS,
                            submission_videos={s.name: s.frame_names for s in sequences})
        return EvalData(self.name, f"mose-{self.split}", root, sequences, "davis")


class LvosPreset(Preset):
    """LVOS v1/v2 valid: <root>/valid/{JPEGImages,Annotations}/<video>/ and the meta JSON
    (valid_meta.json or meta.json) giving each object's frame range. Each object starts at its
    first annotated frame (its range's start); later annotations never re-initialize it. J&F by
    LVOS's protocol (lib.metrics.evaluate_lvos_sequence)."""

    META_NAMES = ("valid_meta.json", "meta.json")
    SPLIT_DIRS = ("valid", "val")

    def __init__(self, name: str = "lvos-val", help: str = ""):
        self.name, self.help = name, help

    def load(self, args) -> EvalData:
        root = resolve_root(args.lvos_root, "LVOS", "LVOS_ROOT", "set the LVOS root with --lvos-root or the LVOS_ROOT environment variable")
        split = next((root / d for d in self.SPLIT_DIRS if (root / d).is_dir()), root / "valid")
        if not split.is_dir() and (root / "JPEGImages").is_dir():
            split = root  # the valid/ folder itself, as lvos-evaluation's --lvos_path
        _require_dirs(split.parent, [f"{split.name}/JPEGImages", f"{split.name}/Annotations"], "--lvos-root",
                      "LVOS valid/")
        meta_path = next((split / m for m in self.META_NAMES if (split / m).is_file()), None)
        if meta_path is None:
            raise FileNotFoundError(f"{root} (--lvos-root) does not have the LVOS layout: expected the meta JSON "
                                    f"{split / self.META_NAMES[0]} (or {self.META_NAMES[1]}), "
                                    f"found {folder_listing(split)}")
        videos = _read_lvos_meta(meta_path)
        folders = sorted(p.name for p in (split / "JPEGImages").iterdir() if p.is_dir())
        unlisted = [v for v in folders if v not in videos]
        absent = [v for v in videos if v not in folders]
        if unlisted or absent:
            raise UsageError(f"{meta_path} does not match the folders in {split / 'JPEGImages'}: "
                             + (f"videos without a folder: {', '.join(absent[:5])}" if absent else "")
                             + ("; " if absent and unlisted else "")
                             + (f"folders not in the meta JSON: {', '.join(unlisted[:5])}" if unlisted else ""))
        names = select_sequences(requested_sequences(args), folders, str(meta_path))
        sequences, ranges = [], {}
        for name in names:
            seq, obj_ranges = _lvos_sequence(name, split, videos[name], meta_path)
            sequences.append(seq)
            ranges[name] = obj_ranges
        return EvalData(self.name, "lvos-valid", root, sequences, "lvos", lvos_ranges=ranges,
                        lvos_unseen=read_lvos_unseen())


def read_lvos_unseen(path: Path = LVOS_UNSEEN) -> list[str]:
    """The video names of dataset/splits/lvos_unseen_videos.txt (lvos-evaluation's
    unseen_videos.txt; lines starting with # are comments)."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _read_lvos_meta(path: Path) -> dict:
    try:
        videos = json.loads(path.read_text())["videos"]
        if not isinstance(videos, dict):
            raise TypeError("'videos' is not a dict")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not an LVOS meta JSON ({{\"videos\": {{video: {{\"objects\": {{id: "
                         f"{{\"frame_range\": {{\"start\", \"end\", \"frame_nums\"}}}}}}}}}}}}): {exc}") from exc
    return videos


def _lvos_sequence(name: str, split: Path, info: dict, meta_path: Path) -> tuple[Sequence, dict[int, LvosRange]]:
    images = list_frames(split / "JPEGImages" / name, "the LVOS layout valid/JPEGImages/<video>/<8-digit frame>.jpg")
    anno_dir = split / "Annotations" / name
    by_number = {int(p.stem): p.stem for p in images if p.stem.isdigit()}
    ranges: dict[int, LvosRange] = {}
    starts: dict[int, str] = {}
    try:
        objects = info["objects"]
        for obj_id, obj in objects.items():
            frame_range = obj["frame_range"]
            start, end = int(frame_range["start"]), int(frame_range["end"])
            length = int(frame_range.get("frame_nums", len(range(start, end, LVOS_STEP))))
            ranges[int(obj_id)] = LvosRange(start, end, length)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{meta_path}: malformed entry for video {name!r}: {exc!r}") from exc
    for obj_id, r in ranges.items():
        in_range = list(range(r.start, r.end, LVOS_STEP))
        if len(in_range) > r.length:  # lvos-evaluation fails with an IndexError
            raise UsageError(f"{meta_path}: video {name!r} object {obj_id}: frame_nums {r.length} is smaller than "
                             f"the {len(in_range)} frames of its range {r.start}..{r.end} (every {LVOS_STEP}th)")
        scored = [in_range[k] for k in lvos_scored_positions(len(in_range), r.length)]
        for number in [r.start] + scored:
            if number not in by_number:
                raise UsageError(f"{meta_path} does not match the folders: video {name!r} object {obj_id} has frame "
                                 f"{number} in its range, but {split / 'JPEGImages' / name} has no such image")
            png = anno_dir / f"{by_number[number]}.png"
            if not png.is_file():
                raise FileNotFoundError(f"{meta_path} does not match the folders: video {name!r} object {obj_id} "
                                        f"needs the annotation {png}")
        starts[obj_id] = by_number[r.start]
    if not starts:
        raise UsageError(f"video {name!r} has no first mask: no object in {meta_path}")
    return Sequence(name, images, _annotations(anno_dir, images), starts, dataset="lvos-valid"), ranges


def _data_root(value, dset: str) -> Path:
    if value is None:
        raise FileNotFoundError(f"--dset {dset} needs --data-root DIR (the folder with JPEGImages/ and Annotations/)")
    return resolve_root(value, f"{dset} data", "", "--data-root")


class FolderPreset(Preset):
    """Any folder in the DAVIS or YouTube-VOS layout (--data-root DIR, optional --split-file),
    e.g. a user's own annotated videos.

    JPEGImages[/480p]/<video>/<frame>.jpg (or .jpeg, .png) and Annotations[/480p]/<video>/<frame>.png
    for both layouts (ytvos: e.g. a YouTube-VOS split folder such as valid/, its meta.json not
    needed); they differ in the default sequence list and the zip. Sequences: --split-file,
    else ImageSets/2017/val.txt when present (davis), else every folder of JPEGImages. An object
    starts at the first annotation PNG holding its id. J&F when every frame has a mask,
    otherwise the masks and a zip in the layout's server format.
    """

    def __init__(self, name: str, layout: str, help: str):
        self.name, self.layout, self.help = name, layout, help
        self.expected = (f"the {name} layout: JPEGImages[/480p]/<video>/<frame>.jpg|.jpeg|.png and "
                         f"Annotations[/480p]/<video>/<frame>.png")

    def _dirs(self, root: Path) -> tuple[Path, Path]:
        """JPEGImages/ and Annotations/, or their 480p/ folders when JPEGImages has one."""
        images, annos = root / "JPEGImages", root / "Annotations"
        if (images / "480p").is_dir():
            if not (annos / "480p").is_dir():
                raise FileNotFoundError(f"{images / '480p'} is there but not {annos / '480p'}/ ({self.expected}); "
                                        f"{annos} holds {folder_listing(annos)}")
            images, annos = images / "480p", annos / "480p"
        return images, annos

    def load(self, args) -> EvalData:
        root = _data_root(args.data_root, self.name)
        _require_dirs(root, ["JPEGImages", "Annotations"], "--data-root", self.name)
        image_root, anno_root = self._dirs(root)
        imageset = root / "ImageSets" / "2017" / "val.txt"
        if args.split_file is not None:
            listed, where = read_sequence_list(Path(args.split_file).expanduser()), f"--split-file {args.split_file}"
        elif self.layout == "davis" and imageset.is_file():
            listed, where = read_sequence_list(imageset), str(imageset)
        else:
            listed = sorted(p.name for p in image_root.iterdir() if p.is_dir())
            where = str(image_root)
        names = select_sequences(requested_sequences(args), listed, where)
        sequences = []
        for name in names:
            image_dir, anno_dir = image_root / name, anno_root / name
            if not image_dir.is_dir():
                raise FileNotFoundError(f"frames of {name!r} (listed in {where}) not found: {image_dir} "
                                        f"({self.expected}); {image_root} holds {folder_listing(image_root)}")
            if not anno_dir.is_dir():
                raise FileNotFoundError(f"video {name!r} has no first mask: {anno_dir} not found ({self.expected}); "
                                        f"{anno_root} holds {folder_listing(anno_root)}")
            images = list_frames(image_dir, self.expected)
            annotations = _annotations(anno_dir, images)
            sequences.append(Sequence(name, images, annotations, _object_starts(name, images, annotations),
                                      dataset=self.name))
        if _all_annotated(sequences):
            return EvalData(self.name, self.name, root, sequences, "davis")
        return EvalData(self.name, self.name, root, sequences, None,
                        submission_prefix=ZIP_DAVIS if self.layout == "davis" else ZIP_YTVOS,
                        submission_videos={s.name: s.frame_names for s in sequences})


PRESETS: dict[str, Preset] = {p.name: p for p in (
    DavisPreset("dv2016val", "2016", "val", "DAVIS 2016 val (objects merged into one): J&F"),
    DavisPreset("dv2017val", "2017", "val", "DAVIS 2017 val: J&F"),
    DavisPreset("dv2017testdev", "2017", "test-dev", "DAVIS 2017 test-dev (first-frame masks only): server zip"),
    YouTubeVOSPreset("yt2018jjval", "jjval", "2018",
                     "upstream's held-out YouTube-VOS 2018 train videos, every 5th frame: J&F"),
    YouTubeVOSPreset("yt2018jjvalAll", "jjval_all_frames", "2018",
                     "the same on all frames, scored on the annotated every-5th frames"),
    YouTubeVOSPreset("yt2018val", "valid", "2018", "YouTube-VOS 2018 valid, every 5th frame: server zip"),
    YouTubeVOSPreset("yt2018valAll", "valid_all_frames", "2018", "YouTube-VOS 2018 valid, all frames: server zip"),
    YouTubeVOSPreset("yt2019val", "valid", "2019", "YouTube-VOS 2019 valid, every 5th frame: server zip"),
    YouTubeVOSPreset("yt2019valAll", "valid_all_frames", "2019", "YouTube-VOS 2019 valid, all frames: server zip"),
    MosePreset("mose-val", "valid", "MOSE valid (first-frame masks only): server zip"),
    MosePreset("mose-train", "train", "MOSE train (every frame annotated): J&F"),
    LvosPreset("lvos-val", "LVOS v1/v2 valid: J&F by LVOS's protocol"),
    FolderPreset("davis-layout", "davis", "any folder in the DAVIS layout (--data-root)"),
    FolderPreset("ytvos-layout", "ytvos", "any folder in the YouTube-VOS layout (--data-root)"),
)}
