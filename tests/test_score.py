"""`evaluate.py --dset PRESET --score RESULTS_DIR`: any results folder scored without a model,
and the folder layouts users have (480p level, .jpeg / .png frames, YouTube-VOS 2019 messages,
all_frames/valid_all_frames). Small: 120x216 synthetic frames; the DAVIS check reuses the
davis2017-evaluation reference numbers of tests/test_metrics.py.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset.presets import PRESETS
from dataset.synthetic import _write_jpeg, make_ytvos_like
from dataset.synthetic_layouts import make_folder_like, make_lvos_scoring_set, make_mose_like
from evaluate import config_from_args, get_parser, main
from lib.image_io import read_label_png, write_label_png
from lib.metrics import evaluate_results
from tests.test_evaluate import _clean_env  # noqa: F401  (no data roots from the environment)
from tests.test_metrics import OFFICIAL_GLOBAL, OFFICIAL_SEQUENCES, TOL, build_eval_sequences

REPO = Path(__file__).resolve().parents[1]


def args(*argv):
    """evaluate.py's flags as its evaluation config (which the presets load)."""
    return config_from_args(get_parser().parse_args(list(argv)))


def score(*argv) -> dict:
    return main(get_parser().parse_args(list(argv)))


def shifted_copy(anno_dir: Path, out_dir: Path) -> None:
    """A fake method's results: every label PNG of anno_dir with object 1 moved 3 px right."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for png in sorted(anno_dir.glob("*.png")):
        labels = read_label_png(png)
        moved = np.where(labels == 1, 0, labels).astype(np.uint8)
        moved[:, 3:][labels[:, :-3] == 1] = 1
        write_label_png(out_dir / png.name, moved)


# ---------------------------------------------------------------------------------------------
# --score on each kind of preset


def test_score_davis_equals_davis2017_evaluation(davis_sample, tmp_path):
    """The sequences of tests/test_metrics.py written as a DAVIS-layout folder (480p level) and a
    results folder: --score gives the official numbers."""
    root, results = tmp_path / "davis", tmp_path / "theirs"
    for name, gt, pred, _ in build_eval_sequences(davis_sample):
        for folder in (root / "JPEGImages/480p" / name, root / "Annotations/480p" / name, results / name):
            folder.mkdir(parents=True)
        for t in range(len(gt)):
            _write_jpeg(root / "JPEGImages/480p" / name / f"{t:05d}.jpg", np.full((*gt.shape[1:], 3), 90, np.uint8))
            write_label_png(root / "Annotations/480p" / name / f"{t:05d}.png", gt[t])
            write_label_png(results / name / f"{t:05d}.png", pred[t])
    out = score("--dset", "davis-layout", "--data-root", str(root), "--score", str(results))
    assert out["J&F"] == pytest.approx(OFFICIAL_GLOBAL["J&F-Mean"], abs=TOL)
    for key, ref in OFFICIAL_SEQUENCES.items():
        name, index = key.rsplit("_", 1)
        obj = out["sequences"][name]["objects"][index]
        assert (obj["J"]["mean"], obj["F"]["decay"]) == pytest.approx((ref[0], ref[5]), abs=TOL), key
    written = json.loads((results / "results.json").read_text())
    assert written["J&F"] == out["J&F"] and written["scored"].startswith("--score")
    rows = list(csv.DictReader((results / "results.csv").open()))
    assert rows[-1]["sequence"] == "overall" and float(rows[-1]["J&F"]) == pytest.approx(out["J&F"], abs=1e-12)


@pytest.mark.parametrize("dset", ["yt2018jjval", "mose-train", "ytvos-layout"])
def test_score_ytvos_and_mose(tmp_path, dset):
    """Every preset family with public ground truth: the J&F of a shifted copy of the ground
    truth equals evaluate_results on the same frames."""
    if dset == "mose-train":
        make_mose_like(tmp_path / "data")
        flags, anno_root, start = ["--mose-root", str(tmp_path / "data")], tmp_path / "data/train/Annotations", None
    else:
        make_ytvos_like(tmp_path / "data", num_sequences=2, num_frames=11, num_train_sequences=1)
        anno_root = tmp_path / "data/train/Annotations"
        if dset == "yt2018jjval":
            flags = ["--ytvos-root", str(tmp_path / "data"), "--split-file", str(tmp_path / "data/ytvos_jjvalid.txt")]
        else:  # the train/ split folder as a user's own ytvos-layout folder
            flags = ["--data-root", str(tmp_path / "data/train"),
                     "--split-file", str(tmp_path / "data/ytvos_jjvalid.txt")]
    data = PRESETS[dset].load(args("--dset", dset, *flags))
    for seq in data.sequences:
        shifted_copy(anno_root / seq.name, tmp_path / "theirs" / seq.name)
    out = score("--dset", dset, *flags, "--score", str(tmp_path / "theirs"))
    items = []
    for seq in data.sequences:
        frames = seq.frame_names
        gt = np.stack([read_label_png(anno_root / seq.name / f"{f}.png") for f in frames])
        pred = np.stack([read_label_png(tmp_path / "theirs" / seq.name / f"{f}.png") for f in frames])
        items.append((seq.name, gt, pred, seq.obj_ids, {o: frames.index(f) for o, f in seq.start_frames.items()}))
    expected = evaluate_results(items)
    assert 0.3 < expected["J&F"] < 0.99  # the shift costs something, not everything
    assert out["J&F"] == pytest.approx(expected["J&F"], abs=1e-12)
    assert (tmp_path / "theirs" / "results.csv").is_file()


def test_score_lvos_from_the_valid_folder_itself(tmp_path):
    """--lvos-root may also be the valid/ folder (lvos-evaluation's --lvos_path)."""
    make_lvos_scoring_set(tmp_path / "lvos", tmp_path / "theirs")
    out = score("--dset", "lvos-val", "--lvos-root", str(tmp_path / "lvos/valid"), "--score", str(tmp_path / "theirs"))
    assert out["metric"] == "lvos" and out["unseen"]["num_objects"] == 2 and out["seen"]["num_objects"] == 3


# ---------------------------------------------------------------------------------------------
# --score errors: one line naming the file


@pytest.fixture()
def own(tmp_path) -> tuple[Path, Path]:
    """A davis-layout folder (every frame annotated) and a perfect results folder."""
    names = make_folder_like(tmp_path / "own", "davis", num_sequences=1, num_frames=4)
    shutil.copytree(tmp_path / "own/Annotations", tmp_path / "theirs")
    return tmp_path / "own", tmp_path / "theirs" / names[0]


def test_score_errors_name_the_file(own, tmp_path):
    root, seq_dir = own
    flags = ["--dset", "davis-layout", "--data-root", str(root), "--score", str(seq_dir.parent)]
    assert score(*flags)["J&F"] == pytest.approx(1.0)
    (seq_dir / "00002.png").rename(seq_dir / "2.png")  # misnamed
    with pytest.raises(FileNotFoundError, match=r"00002\.png \(1 PNG\(s\) there not named like a frame, "
                                                r"e\.g\. 2\.png; frames are named like 00000\.png\)"):
        score(*flags)
    (seq_dir / "2.png").rename(seq_dir / "00002.png")
    write_label_png(seq_dir / "00001.png", np.zeros((60, 80), np.uint8))  # mis-sized
    with pytest.raises(Exception, match=r"00001\.png is 60x80 \(HxW\), expected 120x216"):
        score(*flags)
    shutil.rmtree(seq_dir)
    with pytest.raises(FileNotFoundError, match=f"no folder {seq_dir.name}/"):
        score(*flags)
    with pytest.raises(Exception, match="mose-val has no public ground truth"):
        make_mose_like(tmp_path / "mose", num_sequences=1)
        score("--dset", "mose-val", "--mose-root", str(tmp_path / "mose"), "--score", str(seq_dir.parent))


def test_score_cli_prints_one_error_line(own):
    root, seq_dir = own
    (seq_dir / "00003.png").unlink()
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--dset", "davis-layout",
                           "--data-root", str(root), "--score", str(seq_dir.parent)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: result PNG not found") and "00003.png" in errors[0]


# ---------------------------------------------------------------------------------------------
# Folder layouts


def test_ytvos_layout_with_480p_level_and_jpeg_png_frames(tmp_path):
    names = make_folder_like(tmp_path / "flat", "ytvos", num_sequences=2, num_frames=4)
    root = tmp_path / "nested"
    for sub in ("JPEGImages", "Annotations"):
        shutil.copytree(tmp_path / "flat" / sub, root / sub / "480p")
    for path in (root / "JPEGImages/480p" / names[0]).glob("*.jpg"):
        path.rename(path.with_suffix(".jpeg"))
    for path in (root / "JPEGImages/480p" / names[1]).glob("*.jpg"):  # PNG frames (RGB)
        from PIL import Image
        Image.open(path).save(path.with_suffix(".png"))
        path.unlink()
    for dset in ("ytvos-layout", "davis-layout"):
        data = PRESETS[dset].load(args("--dset", dset, "--data-root", str(root)))
        assert [s.name for s in data.sequences] == names and data.metric == "davis"
        assert [p.name for p in data.sequences[0].image_paths] == [f"{t:05d}.jpeg" for t in range(4)]
        assert data.sequences[1].frame_names == [f"{t:05d}" for t in range(4)]
        assert data.sequences[1].size == (120, 216)


def test_layout_errors_name_the_layout_and_the_folder(tmp_path):
    root = tmp_path / "own"
    make_folder_like(root, "davis", num_sequences=1, num_frames=3)
    video = next((root / "JPEGImages").iterdir())
    for path in video.glob("*.jpg"):
        path.rename(path.with_suffix(".gif"))
    with pytest.raises(FileNotFoundError) as err:
        PRESETS["davis-layout"].load(args("--dset", "davis-layout", "--data-root", str(root)))
    assert f"no frames (*.jpg, *.jpeg, *.png, *.bmp) in {video}" in str(err.value)
    assert "expected the davis-layout layout: JPEGImages[/480p]/" in str(err.value) and "00000.gif" in str(err.value)
    shutil.copy(video / "00000.gif", video / "00000.jpg")
    shutil.copy(video / "00000.gif", video / "00000.png")
    with pytest.raises(ValueError, match=r"holds a frame twice \(00000\.jpg, 00000\.png\)"):
        PRESETS["davis-layout"].load(args("--dset", "davis-layout", "--data-root", str(root)))
    shutil.rmtree(root / "Annotations")
    with pytest.raises(FileNotFoundError, match=r"does not have the ytvos-layout layout: expected .*Annotations/, "
                                                r"found JPEGImages/"):
        PRESETS["ytvos-layout"].load(args("--dset", "ytvos-layout", "--data-root", str(root)))


def test_ytvos_2019_errors_name_2019_and_all_frames_placement(tmp_path):
    root = tmp_path / "yt2019"
    make_ytvos_like(root, num_sequences=1, num_frames=6, num_train_sequences=1)
    (root / "all_frames").mkdir()
    (root / "valid_all_frames").rename(root / "all_frames/valid_all_frames")  # as XMem / Cutie place it
    data = PRESETS["yt2019valAll"].load(args("--dset", "yt2019valAll", "--ytvos-root", str(root)))
    assert data.name == "ytvos2019valid_all_frames"
    assert data.sequences[0].image_paths[0].parent.parent.parent == root / "all_frames/valid_all_frames"
    assert len(data.sequences[0].frame_names) == 6  # every frame, not the every-5th of valid/
    shutil.rmtree(root / "all_frames")
    with pytest.raises(FileNotFoundError) as err:
        PRESETS["yt2019valAll"].load(args("--dset", "yt2019valAll", "--ytvos-root", str(root)))
    message = str(err.value)
    assert "YouTube-VOS 2019" in message and "2018" not in message.replace(str(tmp_path), "")
    assert str(root / "all_frames/valid_all_frames/JPEGImages") in message and "found in" in message
