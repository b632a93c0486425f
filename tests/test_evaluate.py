"""evaluate.py end to end: real DAVIS frames (reduced copy of the sample) and the synthetic
YouTube-VOS layout; results layout, metrics recomputed independently from the written PNGs,
submission zips, resume, and one clear error per kind of bad input.

Kept small for 2 CPU cores: 120x216 frames, 6 (DAVIS) / 16 (YouTube-VOS) frames per sequence,
--num-aug 1, a random ResNet-18 checkpoint.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.parallel_eval import make_checkpoint
from dataset.synthetic import make_ytvos_like
from evaluate import get_parser, main
from lib.metrics import evaluate_results
from lib.cli import UsageError
from lib.image_io import read_label_png, write_label_png
from lib.palette import DAVIS_PALETTE
from evaluation.results import STATS_FILE, SequenceWriter, results_dir_name, sequence_complete
from evaluation.results import load_timeline
from lib import precision
from models.checkpoint import build_network

from conftest import assert_output_error, read_only_folders, run_script
from forged_checkpoints import PAYLOADS, malicious_checkpoint, upstream_trainer_checkpoint

ROOT = Path(__file__).resolve().parents[1]
H, W = 120, 216
DAVIS_FRAMES = 6
DAVIS_SEQS = ("car-shadow", "motocross-jump")  # the sample's val split
YT_FRAMES = 16  # annotated (every 5th): 0, 5, 10, 15
TH = 0.5
ENV = ("DAVIS_ROOT", "YTVOS_ROOT", "MOSE_ROOT", "LVOS_ROOT", "RVOS_MODELS", "RVOS_OUTPUT")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread here: these tiny images gain nothing from two, and two threads slow
    down badly when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------
# Data and checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Random ResNet-18 G-FRTM, rescaled so its outputs are not constant: the mask logits are
    stretched around their median (so masks are non-trivial) and the reuse-gate logits around
    p = 0.5 (so with TH 0.5 both the reuse and the compute path are taken)."""
    return make_checkpoint(tmp_path_factory.mktemp("weights") / "rn18.pth")


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory, davis_sample) -> Path:
    """The sample's val sequences, first 6 frames, 120x216 (masks resized nearest); the
    motocross-jump rider is split at the first frame's median column into objects 1 and 2,
    so dv2017val is multi-object (and dv2016val merges them back)."""
    dst = tmp_path_factory.mktemp("davis")
    for seq in DAVIS_SEQS:
        (dst / "JPEGImages" / "480p" / seq).mkdir(parents=True)
        (dst / "Annotations" / "480p" / seq).mkdir(parents=True)
        split = None
        for src in sorted((davis_sample / "JPEGImages" / "480p" / seq).glob("*.jpg"))[:DAVIS_FRAMES]:
            Image.open(src).convert("RGB").resize((W, H), Image.BILINEAR).save(
                dst / "JPEGImages" / "480p" / seq / src.name, quality=95)
            raw = read_label_png(davis_sample / "Annotations" / "480p" / seq / f"{src.stem}.png")
            labels = np.array(Image.fromarray(raw).resize((W, H), Image.NEAREST))
            if seq == "motocross-jump":
                split = int(np.median(np.nonzero(labels)[1])) if split is None else split
                labels = np.where((labels == 1) & (np.arange(W)[None] >= split), 2, labels).astype(np.uint8)
            write_label_png(dst / "Annotations" / "480p" / seq / f"{src.stem}.png", labels)
    for year in ("2016", "2017"):
        (dst / "ImageSets" / year).mkdir(parents=True)
        (dst / "ImageSets" / year / "val.txt").write_text("\n".join(DAVIS_SEQS) + "\n")
    return dst


@pytest.fixture(scope="module")
def ytvos_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ytvos")
    make_ytvos_like(root, num_sequences=2, num_frames=YT_FRAMES, size=(H, W), num_objects=2,
                    num_train_sequences=1)
    return root


def run(checkpoint, out, *argv, model=None):
    args = ["--model", str(model or checkpoint), "--backbone-weights", "random", "--num-aug", "1",
            "--dev", "cpu", "--output-root", str(out), *argv]
    return main(get_parser().parse_args(args))


def davis_args(davis_root, dset="dv2017val"):
    return ["--dset", dset, "--davis-root", str(davis_root), "--TH", str(TH)]


def yt_args(ytvos_root, dset):
    return ["--dset", dset, "--ytvos-root", str(ytvos_root), "--split-file", str(ytvos_root / "ytvos_jjvalid.txt"),
            "--TH", str(TH)]


@pytest.fixture(scope="module")
def dv2017(checkpoint, davis_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    results = run(checkpoint, out, *davis_args(davis_root))
    return out / "result" / "dv2017val-rn18_0.5_fast", results


# ---------------------------------------------------------------------------------------------
# Checks shared by the end-to-end tests


def png_labels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P", path
        palette = np.array(im.getpalette()[:768], dtype=np.uint8).reshape(-1, 3)
        assert np.array_equal(palette, DAVIS_PALETTE[:len(palette)]), f"{path} has not the DAVIS palette"
        assert im.size == (W, H)
        return np.array(im)


def check_pngs(seq_dir: Path, frames, ids) -> dict:
    assert sorted(p.stem for p in seq_dir.glob("*.png")) == sorted(frames)
    labels = {f: png_labels(seq_dir / f"{f}.png") for f in frames}
    for f, lab in labels.items():
        assert set(np.unique(lab).tolist()) <= {0, *ids}, f
    return labels


def no_partials(results_dir: Path) -> None:
    assert [p.name for p in results_dir.iterdir() if p.name.startswith(".")] == []


def check_json(results_dir: Path, returned: dict, metrics: bool) -> dict:
    on_disk = json.loads((results_dir / "results.json").read_text())
    assert on_disk == returned
    for key in ("fps", "reuse_rate", "sequences", "args", "checkpoint", "device", "torch_version"):
        assert key in on_disk, key
    assert on_disk["torch_version"] == torch.__version__
    assert on_disk["device"] == "cpu"
    assert on_disk["fps"] > 0
    if metrics:
        assert 0 <= on_disk["J&F"] <= 1
        for measure in ("J", "F"):
            assert set(on_disk[measure]) >= {"mean", "recall", "decay"}
        for seq in on_disk["sequences"].values():
            assert {"J&F", "J", "F", "fps", "reuse_rate", "objects"} <= set(seq)
    else:
        assert "J&F" not in on_disk and "J" not in on_disk
    return on_disk


def compare(reported: dict, expected: dict) -> None:
    """Overall and per-sequence J&F / J / F statistics equal."""
    def same(a, b):
        assert (a is None and np.isnan(b)) or a == pytest.approx(b, abs=1e-9), (a, b)

    for entry_r, entry_e in [(reported, expected)] + [(reported["sequences"][n], s)
                                                      for n, s in expected["sequences"].items()]:
        same(entry_r["J&F"], entry_e["J&F"])
        for measure in ("J", "F"):
            for stat in ("mean", "recall", "decay"):
                same(entry_r[measure][stat], entry_e[measure][stat])
    assert set(reported["sequences"]) == set(expected["sequences"])


def davis_gt(davis_root, seq, merge=False) -> np.ndarray:
    frames = []
    for f in range(DAVIS_FRAMES):
        lab = np.array(Image.open(davis_root / "Annotations" / "480p" / seq / f"{f:05d}.png"))
        frames.append((lab > 0).astype(np.uint8) if merge else lab)
    return np.stack(frames)


def png_bytes(results_dir: Path) -> dict[str, bytes]:
    """Every sequence's PNGs, by <sequence>/<frame>.png."""
    return {str(p.relative_to(results_dir)): p.read_bytes() for p in sorted(results_dir.glob("*/*.png"))}


def read_pngs(seq_dir: Path, frames) -> np.ndarray:
    return np.stack([np.array(Image.open(seq_dir / f"{f}.png")) for f in frames])


# ---------------------------------------------------------------------------------------------
# Command line


def test_parser_flags_and_defaults():
    parser = get_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    args = parser.parse_args([])
    assert (args.TH, args.fast, args.num_aug, args.seed, args.backbone_weights) == (0.7, True, 5, 0, "imagenet")
    assert args.dev is None and args.model is None and args.sequences is None
    args = parser.parse_args(["--tau", "0.8", "--no-fast", "--sequences", "a,b", "c", "--num-aug", "3"])
    assert (args.TH, args.fast, args.sequences, args.num_aug) == (0.8, False, ["a,b", "c"], 3)
    assert parser.parse_args(["--TH", "1"]).TH == 1.0
    for bad in (["--TH", "high"], ["--TH", "1.5"], ["--num-aug", "0"], ["--dset", "dv2019val"],
                ["--ftext", "resnet50"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert results_dir_name("dv2017val", "w/gfrtm_rn18.pth", 0.7, True) == "dv2017val-gfrtm_rn18_0.7_fast"
    assert results_dir_name("yt2018val", "m.pth", 1, False) == "yt2018val-m_1.0"


def test_sequence_writer_is_atomic(tmp_path):
    labels = np.ones((4, 5), np.uint8)
    with SequenceWriter(tmp_path, "seq", ["0", "1"]) as writer:
        writer.write("0", labels)
        writer.write("1", labels)
        assert not (tmp_path / "seq").exists()  # nothing visible until finished
        writer.finish({"frames": 2})
    assert sorted(p.name for p in (tmp_path / "seq").iterdir()) == [STATS_FILE, "0.png", "1.png"]
    assert sequence_complete(tmp_path, "seq", ["0", "1"])

    with pytest.raises(RuntimeError, match="boom"):  # interrupted: the old copy stays
        with SequenceWriter(tmp_path, "seq", ["0", "1"]) as writer:
            writer.write("0", labels * 2)
            raise RuntimeError("boom")
    assert np.array_equal(read_label_png(tmp_path / "seq" / "0.png"), labels)
    with pytest.raises(RuntimeError, match="not written"):  # incomplete: finish refuses
        with SequenceWriter(tmp_path, "seq", ["0", "1"]) as writer:
            writer.write("0", labels * 2)
            writer.finish()
    with SequenceWriter(tmp_path, "seq", ["0"]) as writer:  # complete: replaces the old copy
        writer.write("0", labels * 3)
        writer.finish()
    assert sorted(p.name for p in (tmp_path / "seq").iterdir()) == [STATS_FILE, "0.png"]
    assert np.array_equal(read_label_png(tmp_path / "seq" / "0.png"), labels * 3)
    no_partials(tmp_path)


# ---------------------------------------------------------------------------------------------
# End to end


def test_dv2017val_end_to_end(dv2017, davis_root):
    results_dir, results = dv2017
    check_json(results_dir, results, metrics=True)
    no_partials(results_dir)
    ids = {"car-shadow": [1], "motocross-jump": [1, 2]}
    frames = [f"{i:05d}" for i in range(DAVIS_FRAMES)]
    for seq in DAVIS_SEQS:
        labels = check_pngs(results_dir / seq, frames, ids[seq])
        # The first frame's labels are the given annotation.
        assert np.array_equal(labels["00000"], davis_gt(davis_root, seq)[0])
        assert (results_dir / seq / STATS_FILE).is_file()
    assert results["num_objects"] == 3
    assert any(png_labels(results_dir / "car-shadow" / f"{f}.png").any() for f in frames[1:])

    # Reuse: 5 tracked frames x (1 + 2 objects); both paths were taken.
    assert results["tracked_object_frames"] == 15
    assert results["reuse_rate"] == pytest.approx(results["reused_object_frames"] / 15)
    assert 0 < results["reuse_rate"] < 1
    for seq, n_obj in (("car-shadow", 1), ("motocross-jump", 2)):
        s = results["sequences"][seq]
        assert s["frames"] == DAVIS_FRAMES and s["tracked_object_frames"] == 5 * n_obj
        assert s["fps"] == pytest.approx(DAVIS_FRAMES / s["seconds"])
        # The per-frame timeline (for visualize.py) agrees with the counts.
        timeline = load_timeline(results_dir / seq / "timeline.json")
        assert [f["frame"] for f in timeline["frames"]] == frames
        assert sum(v for f in timeline["frames"] for v in f["reused"].values()) == s["reused_object_frames"]
        assert sum(len(f["reused"]) for f in timeline["frames"]) == s["tracked_object_frames"]
        # ... and holds the gate's probabilities, which decided: reuse iff p > TH.
        for f in timeline["frames"]:
            assert f["reuse_prob"].keys() == f["reused"].keys()
            assert all(f["reused"][k] == (p > TH) for k, p in f["reuse_prob"].items()), f
    assert results["fps"] == pytest.approx(2 * DAVIS_FRAMES / sum(s["seconds"] for s in results["sequences"].values()))
    # Wall time: reading ahead, tracking and writing behind, so at least the tracker time.
    for s in results["sequences"].values():
        assert s["seconds"] <= s["wall_seconds"] and s["wall_fps"] == pytest.approx(DAVIS_FRAMES / s["wall_seconds"])
    assert 0 < results["wall_fps"] <= results["fps"]
    assert results["args"]["TH"] == TH and results["args"]["dset"] == "dv2017val"
    assert Path(results["checkpoint"]).name == "rn18.pth" and results["backbone"] == "resnet18"

    # Independent recomputation from the PNGs on disk.
    expected = evaluate_results((seq, davis_gt(davis_root, seq), read_pngs(results_dir / seq, frames), ids[seq])
                                for seq in DAVIS_SEQS)
    compare(results, expected)

    with open(results_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["sequence"], r["object"]) for r in rows] == [("car-shadow", "1"), ("motocross-jump", "1"),
                                                           ("motocross-jump", "2"), ("overall", "")]
    assert float(rows[-1]["J&F"]) == pytest.approx(results["J&F"])
    assert float(rows[0]["J_mean"]) == pytest.approx(expected["sequences"]["car-shadow"]["objects"][1]["J"]["mean"])


def test_dv2016val_environment_fallbacks(checkpoint, davis_root, tmp_path, monkeypatch):
    """Roots, models dir and output root from the environment; --model as a name; objects merged."""
    monkeypatch.setenv("DAVIS_ROOT", str(davis_root))
    monkeypatch.setenv("RVOS_MODELS", str(checkpoint.parent))
    monkeypatch.setenv("RVOS_OUTPUT", str(tmp_path))
    results = main(get_parser().parse_args(["--model", "rn18", "--dset", "dv2016val", "--TH", str(TH),
                                            "--backbone-weights", "random", "--num-aug", "1", "--dev", "cpu",
                                            "--sequences", "motocross-jump"]))
    results_dir = tmp_path / "result" / "dv2016val-rn18_0.5_fast"
    check_json(results_dir, results, metrics=True)
    frames = [f"{i:05d}" for i in range(DAVIS_FRAMES)]
    check_pngs(results_dir / "motocross-jump", frames, [1])
    assert list(results["sequences"]) == ["motocross-jump"] and results["num_objects"] == 1
    expected = evaluate_results([("motocross-jump", davis_gt(davis_root, "motocross-jump", merge=True),
                                  read_pngs(results_dir / "motocross-jump", frames), [1])])
    compare(results, expected)


def _yt_meta(ytvos_root, part):
    return json.loads((ytvos_root / part / "meta.json").read_text())["videos"]


def _yt_expected(ytvos_root, results_dir, videos, frames_of):
    meta = _yt_meta(ytvos_root, "train")
    items = []
    for video in videos:
        frames = frames_of(video)
        gt = np.stack([np.array(Image.open(ytvos_root / "train" / "Annotations" / video / f"{f}.png"))
                       for f in frames])
        objects = meta[video]["objects"]
        first = {int(k): frames.index(v["frames"][0]) for k, v in objects.items()}
        items.append((video, gt, read_pngs(results_dir / video, frames), sorted(first), first))
    return evaluate_results(items)


@pytest.mark.parametrize("dset", ["yt2018jjval", "yt2018jjvalAll"])
def test_ytvos_jjval(checkpoint, ytvos_root, tmp_path, dset):
    results = run(checkpoint, tmp_path, *yt_args(ytvos_root, dset))
    results_dir = tmp_path / "result" / f"{dset}-rn18_0.5_fast"
    check_json(results_dir, results, metrics=True)
    no_partials(results_dir)
    videos = (ytvos_root / "ytvos_jjvalid.txt").read_text().split()
    image_part = "train_all_frames" if dset.endswith("All") else "train"

    def annotated(video):
        return sorted(p.stem for p in (ytvos_root / "train" / "JPEGImages" / video).glob("*.jpg"))

    for video in videos:
        frames = sorted(p.stem for p in (ytvos_root / image_part / "JPEGImages" / video).glob("*.jpg"))
        assert len(frames) == (YT_FRAMES if dset.endswith("All") else len(annotated(video)))
        check_pngs(results_dir / video, frames, [1, 2])
        # Object 2 enters later: tracked from the frame after its first.
        assert results["sequences"][video]["reuse_per_object"]["2"]["tracked"] < \
            results["sequences"][video]["reuse_per_object"]["1"]["tracked"]
    assert results["num_objects"] == 2 * len(videos)
    # J&F only on the annotated every-5th frames, each object after its first frame.
    compare(results, _yt_expected(ytvos_root, results_dir, videos, annotated))


def test_ytvos_valid_submission_zip(checkpoint, ytvos_root, tmp_path):
    videos = sorted(p.name for p in (ytvos_root / "valid" / "Annotations").iterdir())
    expected = {f"Annotations/{v}/{p.stem}.png" for v in videos
                for p in (ytvos_root / "valid" / "JPEGImages" / v).glob("*.jpg")}
    for dset, frames_per_video in (("yt2018val", len(expected) // len(videos)), ("yt2018valAll", YT_FRAMES)):
        results = run(checkpoint, tmp_path, "--dset", dset, "--ytvos-root", str(ytvos_root), "--TH", str(TH))
        results_dir = tmp_path / "result" / f"{dset}-rn18_0.5_fast"
        on_disk = check_json(results_dir, results, metrics=False)
        assert set(on_disk["sequences"]) == set(videos)
        for video in videos:
            assert len(list((results_dir / video).glob("*.png"))) == frames_per_video
        zip_path = results_dir.with_name(results_dir.name + ".zip")
        assert results["submission"]["path"] == str(zip_path) and results["submission"]["missing"] == []
        with zipfile.ZipFile(zip_path) as zf:
            assert set(zf.namelist()) == expected and len(zf.namelist()) == len(expected)
            for name in expected:
                _, video, frame = name.split("/")
                assert zf.read(name) == (results_dir / video / frame).read_bytes()


def test_ytvos_valid_subset_zip(checkpoint, ytvos_root, tmp_path):
    """A subset run zips the finished videos only and names the missing ones."""
    videos = sorted(p.name for p in (ytvos_root / "valid" / "Annotations").iterdir())
    results = run(checkpoint, tmp_path, "--dset", "yt2018val", "--ytvos-root", str(ytvos_root),
                  "--sequences", videos[0])
    assert results["submission"]["missing"] == videos[1:] and results["submission"]["videos"] == 1
    with zipfile.ZipFile(results["submission"]["path"]) as zf:
        assert {n.split("/")[1] for n in zf.namelist()} == {videos[0]}


def test_tau_alias_no_fast_and_threshold_one(checkpoint, davis_root, tmp_path, capsys):
    results = run(checkpoint, tmp_path, "--dset", "dv2017val", "--davis-root", str(davis_root), "--tau", "1.0",
                  "--no-fast", "--sequences", "motocross-jump")
    results_dir = tmp_path / "result" / "dv2017val-rn18_1.0"
    check_json(results_dir, results, metrics=True)
    assert results["threshold"] == 1.0 and results["fast"] is False and results["args"]["TH"] == 1.0
    assert results["reuse_rate"] == 0 and results["reused_object_frames"] == 0
    assert results["tracked_object_frames"] == 10
    assert list(results["sequences"]) == ["motocross-jump"]
    printed = capsys.readouterr()
    assert "device: cpu" in printed.out and "J-Mean" in printed.out and "motocross-jump/2" in printed.out
    assert "reuse rate 0.0%" in printed.out and "FPS" in printed.out
    assert "motocross-jump" in printed.err  # the progress bar


def test_sequences_and_resume(checkpoint, davis_root, tmp_path):
    results_dir = tmp_path / "result" / "dv2017val-rn18_0.5_fast"
    first = run(checkpoint, tmp_path, *davis_args(davis_root), "--sequences", "car-shadow")
    assert sorted(p.name for p in results_dir.iterdir() if p.is_dir()) == ["car-shadow"]
    assert list(first["sequences"]) == ["car-shadow"]
    stamps = {p: p.stat().st_mtime_ns for p in (results_dir / "car-shadow").iterdir()}

    second = run(checkpoint, tmp_path, *davis_args(davis_root), "--sequences", "motocross-jump")
    assert list(second["sequences"]) == ["motocross-jump"]  # metrics over the requested sequences
    assert {p: p.stat().st_mtime_ns for p in (results_dir / "car-shadow").iterdir()} == stamps

    stamps.update({p: p.stat().st_mtime_ns for p in (results_dir / "motocross-jump").iterdir()})
    resumed = run(checkpoint, tmp_path, *davis_args(davis_root), "--resume")
    assert resumed["sequences_computed"] == []
    assert list(resumed["sequences"]) == list(DAVIS_SEQS)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert resumed["sequences"]["car-shadow"]["J&F"] == first["sequences"]["car-shadow"]["J&F"]
    assert resumed["sequences"]["car-shadow"]["fps"] == first["sequences"]["car-shadow"]["fps"]
    assert resumed["tracked_object_frames"] == 15
    no_partials(results_dir)

    # Sequences finished with other settings (here the seed) are not reused.
    reseeded = run(checkpoint, tmp_path, *davis_args(davis_root), "--resume", "--seed", "1")
    assert reseeded["sequences_computed"] == list(DAVIS_SEQS)


def test_compile_flag_reaches_the_tracker(checkpoint, davis_root, tmp_path, cheap_compile):
    got = run(checkpoint, tmp_path, *davis_args(davis_root), "--sequences", "car-shadow", "--compile")
    assert cheap_compile == ["inductor"] and got["sequences_computed"] == ["car-shadow"]
    assert got["args"]["compile"] is True


def test_batch_sequences_writes_the_same_pngs(dv2017, checkpoint, davis_root, tmp_path, monkeypatch):
    """--batch-sequences 2 (the sample's sequences in lockstep, frames batched through the
    backbone) writes byte-identical PNGs and the same J&F and reuse as one at a time."""
    from models.tracker import Tracker

    results_dir, expected = dv2017
    monkeypatch.setattr(Tracker, "track", None)  # the lockstep path only
    got = run(checkpoint, tmp_path, *davis_args(davis_root), "--batch-sequences", "2")
    lockstep_dir = tmp_path / "result" / results_dir.name
    assert png_bytes(lockstep_dir) == png_bytes(results_dir) and len(png_bytes(results_dir)) > 0
    assert got["sequences_computed"] == expected["sequences_computed"] == list(DAVIS_SEQS)
    for seq in DAVIS_SEQS:
        for key in ("J&F", "reuse_rate", "frames"):
            assert got["sequences"][seq][key] == expected["sequences"][seq][key], (seq, key)
    no_partials(lockstep_dir)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the path or flag


def copy_davis(davis_root, tmp_path) -> Path:
    dst = tmp_path / "davis"
    shutil.copytree(davis_root, dst)
    return dst


def test_missing_roots_and_lists(checkpoint, davis_root, tmp_path):
    missing = tmp_path / "no-davis"
    with pytest.raises(FileNotFoundError, match="--davis-root") as err:
        run(checkpoint, tmp_path, "--dset", "dv2017val", "--davis-root", str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="DAVIS_ROOT"):
        run(checkpoint, tmp_path, "--dset", "dv2017val")
    with pytest.raises(FileNotFoundError, match="--ytvos-root") as err:
        run(checkpoint, tmp_path, "--dset", "yt2018val", "--ytvos-root", str(tmp_path / "no-yt"))
    assert str(tmp_path / "no-yt") in str(err.value)

    davis = copy_davis(davis_root, tmp_path)
    shutil.rmtree(davis / "ImageSets" / "2017")
    with pytest.raises(FileNotFoundError) as err:
        run(checkpoint, tmp_path, "--dset", "dv2017val", "--davis-root", str(davis))
    assert str(davis / "ImageSets" / "2017" / "val.txt") in str(err.value)

    with pytest.raises(ValueError, match="--sequences") as err:
        run(checkpoint, tmp_path, *davis_args(davis_root), "--sequences", "car-shadow", "no-such-seq")
    assert "no-such-seq" in str(err.value)

    shutil.rmtree(davis / "JPEGImages" / "480p" / "motocross-jump")  # listed, but no frames
    with pytest.raises(FileNotFoundError) as err:
        run(checkpoint, tmp_path, "--dset", "dv2016val", "--davis-root", str(davis))
    assert str(davis / "JPEGImages" / "480p" / "motocross-jump") in str(err.value)
    assert not (tmp_path / "result").exists()


def test_bad_checkpoints(checkpoint, davis_root, tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="--model") as err:
        run(checkpoint, tmp_path, *davis_args(davis_root), model=missing)
    assert str(missing) in str(err.value)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as err:
        run(checkpoint, tmp_path, *davis_args(davis_root), model=corrupt)
    assert str(corrupt) in str(err.value)

    with pytest.raises(ValueError, match="--ftext") as err:
        run(checkpoint, tmp_path, *davis_args(davis_root), "--ftext", "resnet101")
    assert "resnet101" in str(err.value) and "resnet18" in str(err.value) and str(checkpoint) in str(err.value)

    with pytest.raises(FileNotFoundError, match="--backbone-weights"):
        main(get_parser().parse_args(["--model", str(checkpoint), "--dev", "cpu", *davis_args(davis_root),
                                      "--backbone-weights", str(tmp_path / "nope.pth"), "--output-root",
                                      str(tmp_path)]))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--dev"):
            main(get_parser().parse_args(["--model", str(checkpoint), "--dev", "cuda:0", *davis_args(davis_root)]))


def test_missing_annotation_and_empty_first_mask(checkpoint, davis_root, tmp_path):
    davis = copy_davis(davis_root, tmp_path)
    gone = davis / "Annotations" / "480p" / "motocross-jump" / "00003.png"
    gone.unlink()
    with pytest.raises(FileNotFoundError) as err:
        run(checkpoint, tmp_path, *davis_args(davis))
    assert str(gone) in str(err.value)

    empty = davis / "Annotations" / "480p" / "car-shadow" / "00000.png"
    write_label_png(empty, np.zeros((H, W), np.uint8))
    with pytest.raises(ValueError, match="no object") as err:
        run(checkpoint, tmp_path, *davis_args(davis), "--sequences", "car-shadow")
    assert str(empty) in str(err.value)
    assert not (tmp_path / "result").exists()  # found before any tracking


def test_corrupt_jpeg_keeps_finished_sequences(checkpoint, davis_root, dv2017, tmp_path):
    davis = copy_davis(davis_root, tmp_path)
    bad = davis / "JPEGImages" / "480p" / "motocross-jump" / "00003.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])  # fails in the read-ahead thread, raised at frame 3

    # Fresh output: car-shadow (sorted first) finishes, motocross-jump fails and leaves nothing.
    out = tmp_path / "fresh"
    with pytest.raises(ValueError) as err:
        run(checkpoint, out, *davis_args(davis))
    assert str(bad) in str(err.value) and "--resume" in str(err.value)
    results_dir = out / "result" / "dv2017val-rn18_0.5_fast"
    frames = [f"{i:05d}" for i in range(DAVIS_FRAMES)]
    check_pngs(results_dir / "car-shadow", frames, [1])
    assert (results_dir / "car-shadow" / STATS_FILE).is_file()
    assert not (results_dir / "motocross-jump").exists()
    no_partials(results_dir)
    kept = {p.name: p.stat().st_mtime_ns for p in (results_dir / "car-shadow").iterdir()}

    # The frame repaired, --resume tracks motocross-jump alone: the bytes of an uninterrupted run.
    bad.write_bytes(good)
    resumed = run(checkpoint, out, *davis_args(davis), "--resume")
    assert resumed["sequences_computed"] == ["motocross-jump"]
    assert {p.name: p.stat().st_mtime_ns for p in (results_dir / "car-shadow").iterdir()} == kept
    assert png_bytes(results_dir) == png_bytes(dv2017[0])
    bad.write_bytes(good[:200])

    # Over complete earlier results: the failed recomputation leaves the old copy as it was.
    out = tmp_path / "over"
    shutil.copytree(dv2017[0], out / "result" / dv2017[0].name)
    old = {p.name: p.read_bytes() for p in (out / "result" / dv2017[0].name / "motocross-jump").iterdir()}
    with pytest.raises(ValueError):
        run(checkpoint, out, *davis_args(davis), "--sequences", "motocross-jump")
    seq_dir = out / "result" / dv2017[0].name / "motocross-jump"
    assert {p.name: p.read_bytes() for p in seq_dir.iterdir()} == old
    no_partials(out / "result" / dv2017[0].name)


def test_lockstep_takes_the_longest_sequences_first(checkpoint, davis_root, tmp_path, monkeypatch):
    """--batch-sequences: the sequences enter the lockstep longest first (a freed slot takes the
    longest one left), whatever their order in the split."""
    from models.tracker import Tracker

    davis = copy_davis(davis_root, tmp_path)
    for path in sorted((davis / "JPEGImages" / "480p" / DAVIS_SEQS[0]).glob("*.jpg"))[3:]:
        path.unlink()  # the first sequence of the split keeps 3 of its frames
    entered, track_many = [], Tracker.track_many

    def recording(self, sequences, *args, **kwargs):
        def keys():
            for key, frames in sequences:
                entered.append(key)
                yield key, frames
        return track_many(self, keys(), *args, **kwargs)

    monkeypatch.setattr(Tracker, "track_many", recording)
    got = run(checkpoint, tmp_path, *davis_args(davis), "--batch-sequences", "2")
    assert entered == [DAVIS_SEQS[1], DAVIS_SEQS[0]]
    assert got["sequences"][DAVIS_SEQS[0]]["frames"] == 3


def test_lockstep_failure_names_its_sequence_and_resume_completes(checkpoint, davis_root, dv2017, tmp_path):
    """--batch-sequences 2: a corrupt frame of one sequence stops the run naming that sequence,
    not the other one in flight; the open sequences leave no folders behind; --resume, the frame
    repaired, gives the bytes of an uninterrupted run."""
    davis = copy_davis(davis_root, tmp_path)
    bad = davis / "JPEGImages" / "480p" / "motocross-jump" / "00003.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    with pytest.raises(ValueError) as err:
        run(checkpoint, tmp_path, *davis_args(davis), "--batch-sequences", "2")
    assert str(bad) in str(err.value) and "sequence 'motocross-jump'" in str(err.value)
    assert "--resume" in str(err.value)
    results_dir = tmp_path / "result" / dv2017[0].name
    assert not any((results_dir / seq).exists() for seq in DAVIS_SEQS)  # both were in flight
    no_partials(results_dir)
    bad.write_bytes(good)
    resumed = run(checkpoint, tmp_path, *davis_args(davis), "--batch-sequences", "2", "--resume")
    assert resumed["sequences_computed"] == list(DAVIS_SEQS)
    assert png_bytes(results_dir) == png_bytes(dv2017[0])
    no_partials(results_dir)


def test_a_png_write_error_stops_the_run_naming_the_path(checkpoint, davis_root, dv2017, tmp_path, monkeypatch):
    """ENOSPC in the background PNG writer mid-sequence; --resume then completes the run."""
    import evaluation.results

    write = evaluation.results.write_label_png

    def failing(path, labels):
        if path.parent.name.startswith(".motocross-jump.") and path.name == "00003.png":
            raise OSError(28, "No space left on device", str(path))
        write(path, labels)

    monkeypatch.setattr(evaluation.results, "write_label_png", failing)
    # One `error:` line (a UsageError) naming the file, the sequence and --resume.
    with pytest.raises(UsageError, match="No space left on device.*00003.png.*motocross-jump.*--resume"):
        run(checkpoint, tmp_path, *davis_args(davis_root))
    results_dir = tmp_path / "result" / "dv2017val-rn18_0.5_fast"
    check_pngs(results_dir / "car-shadow", [f"{i:05d}" for i in range(DAVIS_FRAMES)], [1])  # finished before
    assert not (results_dir / "motocross-jump").exists()
    no_partials(results_dir)

    monkeypatch.setattr(evaluation.results, "write_label_png", write)  # space again
    resumed = run(checkpoint, tmp_path, *davis_args(davis_root), "--resume")
    assert resumed["sequences_computed"] == ["motocross-jump"]
    assert png_bytes(results_dir) == png_bytes(dv2017[0])
    no_partials(results_dir)


def test_precision_flag(checkpoint, davis_root, tmp_path, capsys):
    results = run(checkpoint, tmp_path, *davis_args(davis_root), "--precision", "bf16", "--sequences", "car-shadow")
    assert results["args"]["precision"] == "bf16" and results["sequences"]["car-shadow"]["frames"] == DAVIS_FRAMES
    assert "wall FPS" in capsys.readouterr().out
    # Another precision is another setting: --resume recomputes the sequence.
    results = run(checkpoint, tmp_path, *davis_args(davis_root), "--sequences", "car-shadow", "--resume")
    assert results["sequences_computed"] == ["car-shadow"]
    if not precision._cpu_supports_fp16():
        with pytest.raises(UsageError, match="--precision fp16.*--precision bf16"):
            run(checkpoint, tmp_path, *davis_args(davis_root), "--precision", "fp16")


def test_cli_error_exit(checkpoint, davis_root, tmp_path):
    missing = tmp_path / "missing.pth"
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(missing), "--dset", "dv2017val",
                           "--davis-root", str(davis_root), "--dev", "cpu", "--output-root", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert str(missing) in proc.stderr and proc.stderr.count("\n") == 1


def test_upstream_trainer_checkpoint_gives_the_same_pngs(checkpoint, davis_root, dv2017, tmp_path):
    """A checkpoint saved as upstream's trainer saves it (name, epoch, stats of upstream's
    lib.utils.AverageMeter, optimizer, scheduler; upstream key names) evaluates exactly as ours."""
    net, _ = build_network(checkpoint)
    upstream = upstream_trainer_checkpoint(net, tmp_path / "upstream_like.pth")
    run(checkpoint, tmp_path, *davis_args(davis_root), "--sequences", "car-shadow", model=upstream)
    ours = dv2017[0] / "car-shadow"
    got = tmp_path / "result" / "dv2017val-upstream_like_0.5_fast" / "car-shadow"
    pngs = sorted(p.name for p in ours.glob("*.png"))
    assert len(pngs) == DAVIS_FRAMES and sorted(p.name for p in got.glob("*.png")) == pngs
    assert all((got / name).read_bytes() == (ours / name).read_bytes() for name in pngs)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_malicious_checkpoint_runs_nothing(payload, checkpoint, davis_root, tmp_path):
    """--model and --backbone-weights: one error line naming the file and the global, exit 2,
    and the payload's marker file is never created."""
    marker = tmp_path / "MARKER"
    evil = malicious_checkpoint(tmp_path / "evil.pth", payload, marker)
    base = [sys.executable, str(ROOT / "evaluate.py"), "--dset", "dv2017val", "--davis-root", str(davis_root),
            "--dev", "cpu", "--num-aug", "1", "--output-root", str(tmp_path / "out")]
    flags = (["--model", str(evil), "--backbone-weights", "random"],
             ["--model", str(checkpoint), "--backbone-weights", str(evil)])
    for flag in flags[:1] if payload != "os.system" else flags:
        proc = subprocess.run(base + flag, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert f"{evil} was not loaded: it would call {payload.replace('os.', 'posix.')}" in proc.stderr
        assert not marker.exists()


def test_unusable_output_root_is_one_error_line(checkpoint, davis_root, blocked, monkeypatch, capsys):
    """--output-root under a file: one line naming the file and the flag, exit 2, for one threshold
    and for a sweep (whose curve folder is under the same root)."""
    for th in ("0.5", "1.0,0.5"):
        argv = ["--model", checkpoint, "--ftext", "resnet18", "--num-aug", "1", "--backbone-weights", "random",
                "--dev", "cpu", "--output-root", blocked / "out", *davis_args(davis_root)[:-1], th]
        code, err = run_script(monkeypatch, capsys, main, get_parser(), argv)
        assert_output_error(code, err, blocker=blocked)
        assert "--output-root" in err
    assert blocked.read_text() == "not a folder\n"


@read_only_folders
def test_read_only_output_root_is_one_error_line(checkpoint, davis_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        argv = ["--model", checkpoint, "--ftext", "resnet18", "--num-aug", "1", "--backbone-weights", "random",
                "--dev", "cpu", "--output-root", root, *davis_args(davis_root)]
        code, err = run_script(monkeypatch, capsys, main, get_parser(), argv)
    finally:
        root.chmod(0o755)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "ermission" in err, err
