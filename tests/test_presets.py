"""The benchmark presets end to end on synthetic data in each benchmark's layout (DAVIS test-dev,
YouTube-VOS 2019, MOSE, LVOS, generic DAVIS / YouTube-VOS folders): masks, J&F or the server
zip in the server's layout, and one clear error per kind of bad input.

Small for 2 CPU cores: 120x216 frames, 6 frames (21 for LVOS), 2 videos, --num-aug 1.
"""
from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lib.cli import UsageError
import torch
from PIL import Image

from dataset.presets import PRESETS
from dataset.synthetic import make_ytvos_like
from dataset.synthetic_layouts import make_davis_testdev_like, make_folder_like, make_lvos_like, make_mose_like
from evaluate import get_parser, main
from lib.metrics import (evaluate_lvos_object, evaluate_results, lvos_scored_positions, lvos_statistics,
                          lvos_variance)
from evaluation.results import STATS_FILE
# Fixtures: the non-trivial random G-FRTM; one torch thread; no data roots from the environment.
from tests.test_evaluate import _clean_env, _one_thread, checkpoint  # noqa: F401

TH = 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    make_davis_testdev_like(root / "davis")
    make_ytvos_like(root / "ytvos2019", num_sequences=2, num_frames=11, num_train_sequences=1)
    make_mose_like(root / "mose")
    make_lvos_like(root / "lvos")
    make_folder_like(root / "own-davis", "davis", annotated="all")
    make_folder_like(root / "own-ytvos", "ytvos", annotated="first")
    return root


def run(checkpoint, out, *argv):
    return main(get_parser().parse_args(["--model", str(checkpoint), "--backbone-weights", "random", "--num-aug", "1",
                                         "--dev", "cpu", "--output-root", str(out), "--TH", str(TH), *argv]))


def zip_names(path) -> set[str]:
    with zipfile.ZipFile(path) as zf:
        return set(zf.namelist())


def pngs(seq_dir: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted(seq_dir.glob("*.png"))}


def test_every_preset_is_documented_in_the_parser():
    parser = get_parser()
    help_text = parser.format_help()
    for name in PRESETS:
        assert name in help_text
        assert parser.parse_args(["--dset", name]).dset == name
    for flag in ("--mose-root", "--lvos-root", "--data-root"):
        assert flag in help_text


@pytest.mark.parametrize("dset, root_flag, sub, prefix, videos_of", [
    ("dv2017testdev", "--davis-root", "davis", "", lambda r: (r / "ImageSets/2017/test-dev.txt").read_text().split()),
    ("yt2019val", "--ytvos-root", "ytvos2019", "Annotations/",
     lambda r: sorted(p.name for p in (r / "valid/JPEGImages").iterdir())),
    ("mose-val", "--mose-root", "mose", "", lambda r: sorted(p.name for p in (r / "valid/JPEGImages").iterdir())),
    ("ytvos-layout", "--data-root", "own-ytvos", "Annotations/",
     lambda r: sorted(p.name for p in (r / "JPEGImages").iterdir())),
])
def test_submission_presets(checkpoint, data, tmp_path, dset, root_flag, sub, prefix, videos_of):
    """No public ground truth: masks for every frame, and the server's zip in its layout."""
    root = data / sub
    results = run(checkpoint, tmp_path, "--dset", dset, root_flag, str(root))
    results_dir = Path(results["results_dir"])
    assert "J&F" not in results and results["metric"] is None
    videos = videos_of(root)
    image_dir = {"dv2017testdev": root / "JPEGImages/480p", "yt2019val": root / "valid/JPEGImages",
                 "mose-val": root / "valid/JPEGImages", "ytvos-layout": root / "JPEGImages"}[dset]
    expected = {f"{prefix}{v}/{p.stem}.png" for v in videos for p in (image_dir / v).glob("*.jpg")}
    assert zip_names(results["submission"]["path"]) == expected
    assert results["submission"]["missing"] == []
    for video in videos:
        masks = pngs(results_dir / video)
        assert set(masks) == {p.stem for p in (image_dir / video).glob("*.jpg")}
        assert any(m.any() for m in masks.values())
        assert set(np.unique(np.stack(list(masks.values())))) <= {0, 1, 2}
    assert results["sequences"][videos[0]]["fps"] > 0 and results["wall_fps"] > 0


def test_ytvos_layout_objects_enter_later(checkpoint, data, tmp_path):
    """ytvos-layout with first masks only: object 2 starts at the PNG where it first appears."""
    results = run(checkpoint, tmp_path, "--dset", "ytvos-layout", "--data-root", str(data / "own-ytvos"))
    for name, seq in results["sequences"].items():
        per_object = seq["reuse_per_object"]
        assert per_object["2"]["tracked"] == per_object["1"]["tracked"] - 2  # enters at frame 2
        masks = pngs(Path(results["results_dir"]) / name)
        assert not (masks["00000"] == 2).any() and not (masks["00001"] == 2).any()


@pytest.mark.parametrize("dset, flag, sub, anno", [
    ("mose-train", "--mose-root", "mose", lambda r, v: r / "train/Annotations" / v),
    ("davis-layout", "--data-root", "own-davis", lambda r, v: r / "Annotations" / v),
])
def test_presets_with_ground_truth(checkpoint, data, tmp_path, dset, flag, sub, anno):
    """Every frame annotated: J&F by the DAVIS protocol, recomputed here from the PNGs."""
    root = data / sub
    results = run(checkpoint, tmp_path, "--dset", dset, flag, str(root))
    results_dir = Path(results["results_dir"])
    assert results["metric"] == "davis" and "submission" not in results
    items = []
    for video in results["sequences"]:
        gt = pngs(anno(root, video))
        pred = pngs(results_dir / video)
        frames = sorted(gt)
        items.append((video, np.stack([gt[f] for f in frames]), np.stack([pred[f] for f in frames]), [1, 2]))
    expected = evaluate_results(items)
    assert results["J&F"] == pytest.approx(expected["J&F"], abs=1e-12)
    assert (results_dir / "results.csv").is_file()


def lvos_reference(gt_dir: Path, pred_dir: Path, meta: dict) -> tuple[float, float]:
    """(J mean, F mean) over all objects by lvos-evaluation c05e889's rules, re-stated: of the
    frames start, start+5, ... < end, positions 1 .. frame_nums-2 are scored, into a zero-filled
    array of frame_nums-2 entries."""
    from lib.metrics import boundary_f_measure, jaccard_index
    j_means, f_means = [], []
    for video, info in meta.items():
        for obj, o in info["objects"].items():
            r = o["frame_range"]
            size = int(r["frame_nums"]) - 2
            j, f = np.zeros(size), np.zeros(size)
            for k, n in enumerate(range(int(r["start"]), int(r["end"]), 5)):
                if k == 0 or k == size + 1:
                    continue
                gt = np.array(Image.open(gt_dir / video / f"{n:08d}.png")) == int(obj)
                pred = np.array(Image.open(pred_dir / video / f"{n:08d}.png")) == int(obj)
                j[k - 1], f[k - 1] = jaccard_index(gt, pred), boundary_f_measure(gt, pred)
            j_means.append(np.mean(j))
            f_means.append(np.mean(f))
    return float(np.mean(j_means)), float(np.mean(f_means))


def test_lvos_val(checkpoint, data, tmp_path):
    root = data / "lvos"
    meta = json.loads((root / "valid/valid_meta.json").read_text())["videos"]
    results = run(checkpoint, tmp_path, "--dset", "lvos-val", "--lvos-root", str(root))
    results_dir = Path(results["results_dir"])
    assert results["metric"] == "lvos" and results["protocol"] == "lvos-evaluation c05e889"
    j, f = lvos_reference(root / "valid/Annotations", results_dir, meta)
    assert results["all_objects"]["J"]["mean"] == pytest.approx(j, abs=1e-12)
    assert results["seen"]["F"]["mean"] == pytest.approx(f, abs=1e-12)
    # No video on the unseen list: the toolkit's seen/unseen mean is nan, ours null.
    assert results["J&F"] is None and results["unseen"]["num_objects"] == 0
    for video in meta:
        masks = pngs(results_dir / video)
        assert len(masks) == 21 and "00000001" in masks
        # Object 2 starts at frame 00000006 (its first annotated frame), never before; later
        # annotations (which hold both objects) do not re-initialize object 1: it is tracked
        # in every frame after its first.
        assert all(not (masks[f"{n:08d}"] == 2).any() for n in range(1, 6))
        per_object = results["sequences"][video]["reuse_per_object"]
        assert per_object["1"]["tracked"] == 20 and per_object["2"]["tracked"] == 15
        # range 1, 6, 11 (< 16), frame_nums 3: only frame 6 is scored
        assert results["sequences"][video]["objects"]["1"]["num_frames"] == 1


def test_lvos_statistics():
    nan = pytest.approx(np.nan, nan_ok=True)
    # frame_nums 6: 4 entries, the 2 scores padded with zeros
    assert lvos_statistics([1.0, 0.5], 6) == {"mean": 0.375, "recall": 0.25, "decay": nan}
    assert lvos_statistics([], 2)["mean"] == nan
    with pytest.raises(ValueError, match="frame_nums"):
        lvos_statistics([1.0, 1.0], 3)
    # V: population std of (J + F) / 2 over the padded entries, variance rounded to 4 decimals
    assert lvos_variance([1.0], [0.5], 4) == pytest.approx(math.sqrt(round(0.140625, 4)))
    assert [lvos_scored_positions(n, 5) for n in (5, 4, 1)] == [range(1, 4), range(1, 4), range(1, 1)]
    gt = np.zeros((2, 8, 8), np.uint8)
    gt[:, 2:6, 2:6] = 3
    pred = gt.copy()
    pred[1, 2:6, 2:4] = 0  # IoU 0.5
    scores = evaluate_lvos_object(gt, pred, 3, 4)
    assert scores["J"]["mean"] == pytest.approx(0.75) and scores["num_frames"] == 2


# ---------------------------------------------------------------------------------------------
# Bad input


def test_root_without_layout(checkpoint, data, tmp_path):
    wrong = tmp_path / "wrong"
    (wrong / "videos").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        run(checkpoint, tmp_path, "--dset", "mose-val", "--mose-root", str(wrong))
    message = str(err.value)
    assert "--mose-root" in message and str(wrong / "valid" / "JPEGImages") in message and "videos/" in message
    with pytest.raises(FileNotFoundError, match="LVOS_ROOT"):
        run(checkpoint, tmp_path, "--dset", "lvos-val")
    with pytest.raises(FileNotFoundError, match="--data-root"):
        run(checkpoint, tmp_path, "--dset", "davis-layout", "--data-root", str(wrong))
    assert not (tmp_path / "result").exists()


def test_video_without_first_mask(checkpoint, data, tmp_path):
    mose = tmp_path / "mose"
    shutil.copytree(data / "mose", mose)
    video = sorted((mose / "valid/Annotations").iterdir())[1]
    (video / "00000.png").unlink()
    with pytest.raises(FileNotFoundError, match="no first mask") as err:
        run(checkpoint, tmp_path, "--dset", "mose-val", "--mose-root", str(mose))
    assert str(video / "00000.png") in str(err.value)
    own = tmp_path / "own"
    shutil.copytree(data / "own-ytvos", own)
    for png in (own / "Annotations" / "ytvos-own-1").glob("*.png"):
        png.unlink()
    with pytest.raises(ValueError, match="'ytvos-own-1' has no first mask"):
        run(checkpoint, tmp_path, "--dset", "ytvos-layout", "--data-root", str(own))
    assert not (tmp_path / "result").exists()


def test_lvos_meta_not_matching(checkpoint, data, tmp_path):
    lvos = tmp_path / "lvos"
    shutil.copytree(data / "lvos", lvos)
    shutil.copytree(lvos / "valid/JPEGImages/synthlv01", lvos / "valid/JPEGImages/extra")
    with pytest.raises(ValueError, match="does not match") as err:
        run(checkpoint, tmp_path, "--dset", "lvos-val", "--lvos-root", str(lvos))
    assert "extra" in str(err.value) and "valid_meta.json" in str(err.value)
    shutil.rmtree(lvos / "valid/JPEGImages/extra")
    (lvos / "valid/Annotations/synthlv00/00000011.png").unlink()
    with pytest.raises(FileNotFoundError, match="does not match") as err:
        run(checkpoint, tmp_path, "--dset", "lvos-val", "--lvos-root", str(lvos))
    assert str(lvos / "valid/Annotations/synthlv00/00000011.png") in str(err.value)
    assert not (tmp_path / "result").exists()


def test_finished_sequences_kept_on_error(checkpoint, data, tmp_path):
    """A corrupt frame in the second MOSE video: the first video's folder is complete."""
    mose = tmp_path / "mose"
    shutil.copytree(data / "mose", mose)
    videos = sorted(p.name for p in (mose / "valid/JPEGImages").iterdir())
    bad = mose / "valid/JPEGImages" / videos[1] / "00003.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="--resume") as err:
        run(checkpoint, tmp_path, "--dset", "mose-val", "--mose-root", str(mose))
    assert str(bad) in str(err.value)
    results_dir = tmp_path / "result" / f"mose-val-{checkpoint.stem}_{TH}_fast"
    assert (results_dir / videos[0] / STATS_FILE).is_file() and not (results_dir / videos[1]).exists()


def test_config_calls_the_library_from_python(checkpoint, data, tmp_path):
    """evaluation.job.EvalConfig: evaluate.py's defaults, keyword values set over them, as the main
    job and any Python caller build it; the script maps its flags to the same config."""
    from evaluate import config_from_args
    from evaluation.job import EvalConfig
    from evaluation.run import evaluate

    config = EvalConfig(model=str(checkpoint), dset="dv2017testdev", davis_root=data / "davis", output_root=tmp_path,
                        backbone_weights="random", num_aug=1, dev="cpu", TH=TH, sequences=["synth-testdev-00"])
    assert config.fast is True and config.seed == 0 and config.resume is False  # evaluate.py's defaults
    assert config_from_args(get_parser().parse_args([])) == EvalConfig()  # the flags' defaults are the config's
    results = evaluate(config)
    assert list(results["sequences"]) == ["synth-testdev-00"]
    assert results["args"]["davis_root"] == str(data / "davis") and results["args"]["sequences"] == ["synth-testdev-00"]
    with pytest.raises(TypeError, match="davis"):
        EvalConfig(davis=data)
    import visualize
    with pytest.raises(UsageError, match="--results and --frames are required"):  # optional with `curve`
        visualize.main(visualize.get_parser().parse_args(["--out", str(tmp_path)]))

