"""Readers for DAVIS / YouTube-VOS, the Sequence class, palette I/O and the synthetic data."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.davis import DAVISDataset, davis_split, list_davis_sequences
from dataset.sequence import Sequence
from dataset.synthetic import make_davis_like, make_ytvos_like, render_sequence
from dataset.ytvos import YouTubeVOSDataset, valid_frame_names
from lib.image_io import read_image, read_label_png, write_label_png
from lib.palette import DAVIS_PALETTE
from tools.synthetic_data import get_parser as synthetic_parser
from tools.synthetic_data import main as run_synthetic

SIZE = (48, 80)


@pytest.fixture(scope="module")
def synth_davis(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_davis")
    make_davis_like(root, num_sequences=2, num_frames=6, size=SIZE, num_objects=2, seed=3,
                    num_train_sequences=1)
    return root


@pytest.fixture(scope="module")
def synth_ytvos(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_ytvos")
    lists = make_ytvos_like(root, num_sequences=2, num_frames=16, size=SIZE, num_objects=2, seed=5,
                            num_train_sequences=1)
    return root, lists


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Palette and file I/O


def test_palette_matches_davis_annotations(davis_sample):
    with Image.open(davis_sample / "Annotations" / "480p" / "dog" / "00000.png") as im:
        palette = np.array(im.getpalette()).reshape(-1, 3)
    assert np.array_equal(palette, DAVIS_PALETTE)


def test_label_png_round_trip(tmp_path):
    labels = (np.arange(30 * 40).reshape(30, 40) % 7).astype(np.uint8)
    path = tmp_path / "x.png"
    write_label_png(path, labels)
    assert np.array_equal(read_label_png(path), labels)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im.getpalette()).reshape(-1, 3)[:256], DAVIS_PALETTE)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left behind


def test_io_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_label_png(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        read_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        read_label_png(bad)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(ValueError, match="rgb.png"):
        read_label_png(rgb)


def test_truncated_jpeg_is_a_value_error(davis_sample, tmp_path):
    data = (davis_sample / "JPEGImages" / "480p" / "dog" / "00000.jpg").read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.jpg"):
        read_image(bad)


# ---------------------------------------------------------------------------------------------
# DAVIS on the real sample


def test_davis_2017_val_on_sample(davis_sample):
    dset = DAVISDataset(davis_sample, year="2017", split="val")
    assert dset.name == "dv2017val"
    assert dset.sequence_names == ["car-shadow", "motocross-jump"]
    seq = dset[0]
    assert isinstance(seq, Sequence)
    assert seq.name == "car-shadow" and len(seq) == 40
    assert seq.size == (480, 854)
    assert seq.obj_ids == [1]
    assert seq.frame_names[:2] == ["00000", "00001"]

    image, labels, new_ids = seq[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 480, 854)
    expected = np.array(Image.open(davis_sample / "JPEGImages/480p/car-shadow/00000.jpg").convert("RGB"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    assert labels.dtype == torch.uint8 and labels.shape == (480, 854)
    assert new_ids == [1]
    assert np.array_equal(labels.numpy(), read_label_png(davis_sample / "Annotations/480p/car-shadow/00000.png"))

    image, labels, new_ids = seq[1]
    assert labels is None and new_ids == []

    gt = seq.ground_truth()
    assert gt.shape == (40, 480, 854) and gt.dtype == np.uint8
    assert set(np.unique(gt)) == {0, 1}
    assert seq.first_frame_indices == {1: 0}


def test_davis_2016_and_train_split_on_sample(davis_sample):
    dset = DAVISDataset(davis_sample, year="2016", split="val", sequences=["motocross-jump"])
    assert len(dset) == 1 and dset.name == "dv2016val"
    seq = next(iter(dset))
    assert seq.obj_ids == [1] and seq.merge_objects

    assert list_davis_sequences(davis_sample, "2017", "train") == ["blackswan", "dog", "libby"]
    files = davis_split(davis_sample, "2017", "train")
    assert [f.name for f in files] == ["blackswan", "dog", "libby"]
    dog = files[1]
    assert len(dog.image_paths) == 60 and dog.frame_names[0] == "00000"
    assert all(dog.annotation_paths[f].is_file() for f in dog.frame_names)


def test_davis_errors(davis_sample, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--davis-root.*DAVIS_ROOT"):
        DAVISDataset(tmp_path / "missing", year="2017")
    monkeypatch.delenv("DAVIS_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="--davis-root"):
        DAVISDataset(None, year="2017")
    monkeypatch.setenv("DAVIS_ROOT", str(davis_sample))
    assert len(DAVISDataset(None, year="2017", split="val")) == 2

    with pytest.raises(FileNotFoundError, match=r"ImageSets/2016/train\.txt"):
        DAVISDataset(davis_sample, year="2016", split="train")
    with pytest.raises(ValueError, match="year"):
        DAVISDataset(davis_sample, year="2018")
    with pytest.raises(ValueError, match="bogus"):
        DAVISDataset(davis_sample, year="2017", sequences=["bogus"])


def test_davis_broken_sequences(synth_davis, tmp_path):
    root = tmp_path / "davis"
    shutil.copytree(synth_davis, root)
    names = list_davis_sequences(root, "2017", "val")

    # Missing sequence directory: found when the data set is opened, or when the sequence is.
    dset = DAVISDataset(root, "2017")
    shutil.rmtree(root / "JPEGImages" / "480p" / names[0])
    with pytest.raises(FileNotFoundError, match=names[0] + ".*--davis-root"):
        DAVISDataset(root, "2017")
    with pytest.raises(FileNotFoundError, match=names[0] + ".*--davis-root"):
        dset.sequence(names[0])

    # Corrupt JPEG: found when the frame is read (lazily), named in the error.
    seq = dset.sequence(names[1])
    (root / "JPEGImages" / "480p" / names[1] / "00002.jpg").write_bytes(b"\xff\xd8garbage")
    assert seq[1][1] is None  # other frames still read
    with pytest.raises(ValueError, match="00002.jpg"):
        list(seq)

    # First-frame annotation without any object.
    first = root / "Annotations" / "480p" / names[1] / "00000.png"
    write_label_png(first, np.zeros(SIZE, np.uint8))
    with pytest.raises(ValueError, match="00000.png"):
        dset.sequence(names[1])

    # Missing first-frame annotation.
    first.unlink()
    with pytest.raises(FileNotFoundError, match="00000.png"):
        dset.sequence(names[1])


# ---------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic(tmp_path):
    for name in ("a", "b"):
        make_davis_like(tmp_path / name, num_sequences=1, num_frames=3, size=SIZE, seed=11,
                        num_train_sequences=0)
    make_davis_like(tmp_path / "c", num_sequences=1, num_frames=3, size=SIZE, seed=12,
                    num_train_sequences=0)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_synthetic_objects_move_and_occlude():
    occluded = False
    for index in range(4):
        frames, labels = render_sequence((0, 9, index), 20, (60, 100), 2)
        assert frames.shape == (20, 60, 100, 3) and labels.shape == (20, 60, 100)
        assert set(np.unique(labels[0])) == {0, 1, 2}  # all objects visible in frame 0
        centres = [np.argwhere(labels[t] == 1).mean(0) for t in (0, 19)]
        assert np.linalg.norm(centres[1] - centres[0]) > 5  # objects move
        rows1 = [np.any(labels[t] == 1, axis=1) for t in range(20)]
        cols2 = [np.any(labels[t] == 2, axis=0) for t in range(20)]
        cols1 = [np.any(labels[t] == 1, axis=0) for t in range(20)]
        rows2 = [np.any(labels[t] == 2, axis=1) for t in range(20)]
        occluded |= any((rows1[t] & rows2[t]).any() and (cols1[t] & cols2[t]).any() for t in range(20))
    assert occluded  # bounding boxes of the two objects meet in some frame


def _consecutive_iou(labels: np.ndarray, obj: int) -> np.ndarray:
    m = labels == obj
    inter = (m[1:] & m[:-1]).sum(axis=(1, 2))
    union = (m[1:] | m[:-1]).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


def test_synthetic_stop_and_go_holds_and_dashes():
    """Stop-and-go: still camera, objects holding (consecutive masks nearly equal) for most
    frames and dashing (consecutive masks far apart) in between; longer holds, more still frames;
    seeded; an unknown motion is an error."""
    still, dashes, occluded = [], 0, False
    for index in range(3):
        frames, labels = render_sequence((0, 9, index), 40, (60, 100), 2, motion="stop-and-go")
        assert set(np.unique(labels[0])) == {0, 1, 2}
        background = (labels[0] == 0) & (labels[-1] == 0)
        np.testing.assert_array_equal(frames[0][background], frames[-1][background])  # still camera
        for obj in (1, 2):
            iou = _consecutive_iou(labels, obj)
            still.append((iou > 0.9).mean())
            dashes += int((iou < 0.5).any())
        counts = [(labels == 1).sum(axis=(1, 2)), (labels == 2).sum(axis=(1, 2))]
        occluded |= bool((counts[0] < 0.8 * counts[0].max()).any() or (counts[1] < 0.8 * counts[1].max()).any())
    assert np.mean(still) > 0.6 and dashes == 6 and occluded
    long_holds = [(_consecutive_iou(render_sequence((0, 9, i), 40, (60, 100), 2, motion="stop-and-go",
                                                    hold=(0.6, 1.0))[1], 1) > 0.9).mean() for i in range(3)]
    assert np.mean(long_holds) > np.mean(still[::2])
    a = render_sequence((1,), 12, (48, 80), 2, motion="stop-and-go")
    b = render_sequence((1,), 12, (48, 80), 2, motion="stop-and-go")
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="motion"):
        render_sequence((1,), 4, (48, 80), 2, motion="jerky")


def test_synthetic_stop_and_go_ytvos_late_object(tmp_path):
    lists = make_ytvos_like(tmp_path, num_sequences=1, num_frames=16, size=SIZE, num_objects=2, seed=1,
                            num_train_sequences=0, motion="stop-and-go")
    video = lists["jjval"][0]
    seq = YouTubeVOSDataset(tmp_path, "jjval_all_frames", split_file=tmp_path / "ytvos_jjvalid.txt")[0]
    assert seq.name == video and len(seq) == 16
    starts = seq.first_frame_indices
    assert starts[1] == 0 and starts[2] in (5, 10)


def test_synthetic_folder_late_object_every_frame_annotated(tmp_path):
    """The main job's validation layout: a YouTube-VOS-layout folder, every frame annotated, object
    2 absent before `enter_at` and present from it on; stop-and-go motion holds still."""
    from dataset.synthetic_layouts import make_folder_like
    names = make_folder_like(tmp_path, "ytvos", num_sequences=1, num_frames=12, size=SIZE, seed=0,
                             annotated="all", enter_at=5, motion="stop-and-go")
    annotations = sorted((tmp_path / "Annotations" / names[0]).glob("*.png"))
    assert len(annotations) == len(list((tmp_path / "JPEGImages" / names[0]).glob("*.jpg"))) == 12
    present = [bool((read_label_png(p) == 2).any()) for p in annotations]
    assert present == [False] * 5 + [True] * 7
    labels = np.stack([read_label_png(p) for p in annotations])
    assert max(_consecutive_iou(labels, 1)) > 0.95  # somewhere object 1 holds still


def test_synthetic_davis_reads_back(synth_davis):
    dset = DAVISDataset(synth_davis, year="2017", split="val")
    assert dset.sequence_names == ["synth-val-00", "synth-val-01"]
    seq = dset[0]
    assert len(seq) == 6 and seq.size == SIZE and seq.obj_ids == [1, 2]
    frames = list(seq)
    assert [f[2] for f in frames] == [[1, 2]] + [[]] * 5
    assert set(np.unique(frames[0][1].numpy())) == {0, 1, 2}
    assert seq.ground_truth().shape == (6,) + SIZE

    merged = DAVISDataset(synth_davis, year="2016", split="val")[0]
    assert merged.obj_ids == [1]
    assert set(np.unique(merged[0][1].numpy())) == {0, 1}
    assert set(np.unique(merged.ground_truth())) == {0, 1}
    assert DAVISDataset(synth_davis, year="2017", split="train").sequence_names == ["synth-train-00"]


def test_synthetic_ytvos_jjval(synth_ytvos):
    root, lists = synth_ytvos
    dset = YouTubeVOSDataset(root, "jjval", split_file=root / "ytvos_jjvalid.txt")
    assert dset.sequence_names == lists["jjval"]
    seq = dset[0]
    assert seq.frame_names == ["00000", "00005", "00010", "00015"]  # train/: every 5th frame
    start = seq.start_frames[2]
    assert seq.start_frames[1] == "00000" and start != "00000"  # object 2 enters later
    gt = seq.ground_truth()
    assert gt is not None and gt.shape == (4,) + SIZE
    start_index = seq.frame_names.index(start)
    assert not (gt[:start_index] == 2).any() and (gt[start_index] == 2).any()

    for t, (image, labels, new_ids) in enumerate(seq):
        assert image.shape == (3,) + SIZE
        if t == 0:
            assert new_ids == [1] and set(np.unique(labels.numpy())) == {0, 1}
        elif t == start_index:
            # Only the object starting here: object 1's pixels are suppressed.
            assert new_ids == [2] and set(np.unique(labels.numpy())) == {0, 2}
            assert (gt[t] == 1).any()
        else:
            assert labels is None and new_ids == []

    all_frames = YouTubeVOSDataset(root, "jjval_all_frames", split_file=root / "ytvos_jjvalid.txt")[0]
    assert len(all_frames) == 16 and all_frames.ground_truth() is None
    assert all_frames.first_frame_indices[2] == int(start)

    train = YouTubeVOSDataset(root, "jjtrain", split_file=root / "ytvos_jjtrain.txt")
    assert train.sequence_names == lists["jjtrain"]


def test_synthetic_ytvos_valid(synth_ytvos):
    root, lists = synth_ytvos
    for split, num_frames in (("valid", 4), ("valid_all_frames", 16)):
        dset = YouTubeVOSDataset(root, split)
        assert dset.sequence_names == lists["valid"]
        seq = dset[0]
        assert len(seq) == num_frames and seq.ground_truth() is None
        start = seq.start_frames[2]
        assert start != "00000"
        given = [(seq.frame_names[t], ids) for t, (_, labels, ids) in enumerate(seq) if labels is not None]
        assert given == [("00000", [1]), (start, [2])]
        _, labels, _ = seq[seq.frame_names.index(start)]
        assert set(np.unique(labels.numpy())) == {0, 2}
    assert valid_frame_names(root, lists["valid"][0]) == ["00000", "00005", "00010", "00015"]


def test_ytvos_errors(synth_ytvos, tmp_path, monkeypatch):
    root, lists = synth_ytvos
    with pytest.raises(FileNotFoundError, match="--ytvos-root.*YTVOS_ROOT"):
        YouTubeVOSDataset(tmp_path / "missing", "valid")
    monkeypatch.delenv("YTVOS_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="--ytvos-root"):
        YouTubeVOSDataset(None, "valid")
    monkeypatch.setenv("YTVOS_ROOT", str(root))
    assert len(YouTubeVOSDataset(None, "valid")) == 2
    with pytest.raises(ValueError, match="split"):
        YouTubeVOSDataset(root, "test")

    # Default jjval list: the 300 real video ids, which this root does not hold.
    first_real = (Path(__file__).parents[1] / "dataset/splits/ytvos_jjvalid.txt").read_text().split()
    with pytest.raises(FileNotFoundError, match=f"300 of 300 .*{sorted(first_real)[0]}.*--ytvos-root"):
        YouTubeVOSDataset(root, "jjval")
    with pytest.raises(FileNotFoundError, match="valid_all_frames"):
        YouTubeVOSDataset(tmp_path, "valid_all_frames")

    broken = tmp_path / "yt"
    shutil.copytree(root, broken)
    video = lists["valid"][0]
    start = YouTubeVOSDataset(broken, "valid").start_frames(video)[2]
    (broken / "valid" / "Annotations" / video / f"{start}.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{start}.png"):
        YouTubeVOSDataset(broken, "valid").sequence(video)
    with pytest.raises(FileNotFoundError, match="valid/JPEGImages/nope"):
        valid_frame_names(broken, "nope")
    (broken / "valid" / "meta.json").write_text("{broken")
    with pytest.raises(ValueError, match="meta.json"):
        YouTubeVOSDataset(broken, "valid")


def synthetic_main(argv):
    run_synthetic(synthetic_parser().parse_args(argv))


def test_synthetic_cli(tmp_path):
    synthetic_main(["--out", str(tmp_path / "d"), "--layout", "davis", "--sequences", "1",
                    "--train-sequences", "0", "--frames", "3", "--size", "32x48", "--seed", "2"])
    seq = DAVISDataset(tmp_path / "d", "2017")[0]
    assert seq.size == (32, 48) and len(seq) == 3
    synthetic_main(["--out", str(tmp_path / "y"), "--layout", "ytvos", "--sequences", "1",
                    "--train-sequences", "0", "--frames", "11", "--size", "32x48", "--objects", "3"])
    seq = YouTubeVOSDataset(tmp_path / "y", "valid")[0]
    assert seq.obj_ids == [1, 2, 3] and len(seq) == 3
    with pytest.raises(SystemExit):
        synthetic_main(["--out", str(tmp_path / "z"), "--layout", "davis", "--size", "big"])
    with pytest.raises(SystemExit):
        synthetic_main(["--out", str(tmp_path / "z"), "--layout", "davis", "--objects", "0"])
