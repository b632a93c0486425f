"""demo.py on one's own video: frame folders and MP4s, first-frame mask or mask folders with
objects entering later, resizing to --max-size and back, outputs, and errors."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import demo
from dataset.synthetic import render_sequence
from lib.image_io import read_image, read_label_png, write_label_png
from lib.palette import DAVIS_PALETTE
from lib.video_io import MaskSet, natural_key, open_frames, processing_size, same_aspect
from models.checkpoint import save_checkpoint
from models.network import GFRTM

from conftest import ROOT, assert_output_error, run_script

DOG_SIZE = (121, 215)  # odd, so the MP4 writer pads; tracked at 64 x 114 with --max-size 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "random.pth"
    torch.manual_seed(0)
    save_checkpoint(path, GFRTM("resnet18").eval())
    return path


@pytest.fixture(scope="module")
def dog(davis_sample, tmp_path_factory):
    """The first 4 frames of DAVIS 'dog' at DOG_SIZE (frames/*.jpg) and its first mask (mask.png)."""
    root = tmp_path_factory.mktemp("dog")
    (root / "frames").mkdir()
    h, w = DOG_SIZE
    for t in range(4):
        image = read_image(davis_sample / "JPEGImages" / "480p" / "dog" / f"{t:05d}.jpg")
        small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        Image.fromarray(small).save(root / "frames" / f"{t:05d}.jpg", quality=95)
    labels = read_label_png(davis_sample / "Annotations" / "480p" / "dog" / "00000.png")
    write_label_png(root / "mask.png", cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST_EXACT))
    return root


def run_demo(video, mask, checkpoint, out, *extra):
    args = demo.video_parser().parse_args(
        ["--video", str(video), "--mask", str(mask), "--model", str(checkpoint), "--out", str(out),
         "--dev", "cpu", "--num-aug", "1", "--backbone-weights", "random", *extra])
    return demo.main(args)


def decode_mp4(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def gif_frame_ms(path):
    with Image.open(path) as im:
        return im.info["duration"]


def check_outputs(out, stems, size):
    """masks/<stem>.png at `size` with the DAVIS palette; overlays and timeline decode."""
    masks = sorted(p.stem for p in (out / "masks").glob("*.png"))
    assert masks == sorted(stems)
    for stem in stems:
        with Image.open(out / "masks" / f"{stem}.png") as im:
            assert im.mode == "P"
            assert im.size == (size[1], size[0])
            palette = np.array(im.getpalette()[:768], np.uint8).reshape(-1, 3)
            np.testing.assert_array_equal(palette[:8], DAVIS_PALETTE[:8])
    mp4 = decode_mp4(out / "overlay.mp4")
    assert len(mp4) == len(stems)
    assert mp4[0].shape[:2] == (size[0] + size[0] % 2, size[1] + size[1] % 2)
    with Image.open(out / "overlay.gif") as im:
        assert im.n_frames == len(stems)
        assert im.size[0] <= 427
    with Image.open(out / "timeline.png") as im:
        im.load()
        assert im.mode == "RGB"
    timeline = json.loads((out / "timeline.json").read_text())
    assert [f["frame"] for f in timeline["frames"]] == list(stems)
    assert timeline["fps"] > 0
    return timeline


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_frame_folder_resized_and_back(dog, checkpoint, tmp_path):
    out = tmp_path / "out"
    summary = run_demo(dog / "frames", dog / "mask.png", checkpoint, out, "--max-size", "64")
    assert summary["size"] == DOG_SIZE and summary["tracking_size"] == (64, 114)
    # A frame folder has no frame rate: the overlays get the default.
    assert summary["fps_out"] == demo.DEFAULT_FPS_OUT == 10
    assert gif_frame_ms(out / "overlay.gif") == 100
    stems = [f"{t:05d}" for t in range(4)]
    timeline = check_outputs(out, stems, DOG_SIZE)
    assert timeline["frames"][0]["reused"] == {}
    assert all(set(f["reused"]) == {"1"} for f in timeline["frames"][1:])
    # Frame 0 is the given mask, down to 64 x 114 and back up: close to the input.
    given = read_label_png(dog / "mask.png") == 1
    first = read_label_png(out / "masks" / "00000.png")
    assert set(np.unique(first)) <= {0, 1}
    assert iou(first == 1, given) > 0.85
    # The overlay shows object 1 in its palette colour (dark red) over the frame.
    with Image.open(out / "overlay.gif") as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    frame = read_image(dog / "frames" / "00000.jpg").astype(int)
    inner = cv2.erode(given.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    expected = (frame[inner] + np.array([128, 0, 0])) / 2
    assert np.abs(rgb[inner].mean(0) - expected.mean(0)).max() < 10


def test_mp4_video_and_half_size_mask(dog, checkpoint, tmp_path):
    h, w = 120, 214  # even: the MP4 we write keeps every pixel
    video = tmp_path / "dog clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 24, (w, h))
    for t in range(4):
        image = cv2.resize(read_image(dog / "frames" / f"{t:05d}.jpg"), (w, h), interpolation=cv2.INTER_AREA)
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    writer.release()
    # A mask at half the frame size is accepted (same aspect ratio).
    mask = tmp_path / "half.png"
    write_label_png(mask, cv2.resize(read_label_png(dog / "mask.png"), (107, 60),
                                     interpolation=cv2.INTER_NEAREST_EXACT))
    frames = open_frames(video)
    assert frames.kind == "video" and frames.size == (h, w) and frames.name == "dog clip"
    assert abs(frames.fps - 24) < 1e-3
    out = tmp_path / "out"
    summary = run_demo(video, mask, checkpoint, out, "--max-size", "60")
    assert summary["tracking_size"] == (60, 107)  # the mask's own size: used as it is
    check_outputs(out, [f"{t:05d}" for t in range(4)], (h, w))
    # The overlays keep the video's frame rate by default.
    assert summary["fps_out"] == pytest.approx(24)
    assert open_frames(out / "overlay.mp4").fps == pytest.approx(24)
    assert gif_frame_ms(out / "overlay.gif") == 40  # 1000 / 24 ms, in the GIF's 10 ms units


def test_compile_flag_reaches_the_tracker(dog, checkpoint, tmp_path, cheap_compile):
    out = run_demo(dog / "frames", dog / "mask.png", checkpoint, tmp_path / "out", "--compile")
    assert cheap_compile == ["inductor"] and out["frames"] == 4


def test_fps_out_overrides_the_video_frame_rate(tmp_path):
    assert demo.overlay_fps(None, 24.0) == 24.0
    assert demo.overlay_fps(None, None) == demo.DEFAULT_FPS_OUT
    assert demo.overlay_fps(5.0, 24.0) == 5.0
    required = ["--video", "v", "--mask", "m.png", "--model", "c.pth"]
    assert demo.video_parser().parse_args([*required, "--fps-out", "12.5"]).fps_out == 12.5
    with pytest.raises(SystemExit):
        demo.video_parser().parse_args([*required, "--fps-out", "0"])


def test_late_object_from_mask_folder(checkpoint, tmp_path):
    size, late = (64, 112), 3
    images, labels = render_sequence([11], 6, size, 2, first_frames=[0, late])
    frames_dir, masks_dir = tmp_path / "clip", tmp_path / "masks"
    frames_dir.mkdir()
    masks_dir.mkdir()
    stems = [f"frame_{t}" for t in range(6)]  # natural order, not zero-padded
    for stem, image in zip(stems, images):
        Image.fromarray(image).save(frames_dir / f"{stem}.png")
    write_label_png(masks_dir / f"{stems[0]}.png", labels[0])
    write_label_png(masks_dir / f"{stems[late]}.png", labels[late])  # objects 1 and 2: only 2 is new
    assert (labels[late] == 2).any() and not (labels[:late] == 2).any()
    masks = MaskSet(masks_dir)
    assert [(s.key, s.new_ids) for s in masks.starts] == [("frame_0", [1]), ("frame_3", [2])]

    out = tmp_path / "out"
    summary = run_demo(frames_dir, masks_dir, checkpoint, out, "--fps-out", "5")  # 64 <= 480: no resize
    timeline = check_outputs(out, stems, size)
    assert summary["fps_out"] == 5 and gif_frame_ms(out / "overlay.gif") == 200
    tracked_2 = ["2" in f["reused"] for f in timeline["frames"]]
    assert tracked_2 == [False] * (late + 1) + [True] * (5 - late)
    assert all("1" in f["reused"] for f in timeline["frames"][1:])
    for t in range(late):
        assert not (read_label_png(out / "masks" / f"{stems[t]}.png") == 2).any()
    start = read_label_png(out / "masks" / f"{stems[late]}.png")
    np.testing.assert_array_equal(start == 2, labels[late] == 2)  # the given mask claims its pixels


def test_resize_rules():
    assert processing_size(1080, 1920, 480) == (480, 853)
    assert processing_size(480, 854, 480) == (480, 854)
    assert processing_size(1920, 1080, 480) == (853, 480)
    assert processing_size(2000, 3000, 0) == (2000, 3000)
    assert same_aspect((480, 854), (1080, 1920))  # DAVIS 480p annotation of a 1080p video
    assert same_aspect((60, 107), (120, 214))
    assert not same_aspect((50, 50), (120, 214))
    assert not same_aspect((120, 200), (120, 214))
    assert sorted(["f10", "f2", "f1"], key=natural_key) == ["f1", "f2", "f10"]


def test_errors(dog, checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="--video.*nope"):
        run_demo(tmp_path / "nope.mp4", dog / "mask.png", checkpoint, out)
    with pytest.raises(FileNotFoundError, match="--mask.*nope"):
        run_demo(dog / "frames", tmp_path / "nope.png", checkpoint, out)
    with pytest.raises(FileNotFoundError, match="--model"):
        run_demo(dog / "frames", dog / "mask.png", tmp_path / "nope.pth", out)
    bad_video = tmp_path / "broken.mp4"
    bad_video.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="--video.*broken.mp4"):
        run_demo(bad_video, dog / "mask.png", checkpoint, out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--video.*no image files"):
        run_demo(tmp_path / "empty", dog / "mask.png", checkpoint, out)
    blank = tmp_path / "blank.png"
    write_label_png(blank, np.zeros(DOG_SIZE, np.uint8))
    with pytest.raises(ValueError, match="--mask.*blank.png.*no object"):
        run_demo(dog / "frames", blank, checkpoint, out)
    square = tmp_path / "square.png"
    write_label_png(square, np.ones((50, 50), np.uint8))
    with pytest.raises(ValueError, match="--mask.*square.png.*does not fit"):
        run_demo(dog / "frames", square, checkpoint, out)
    rgb_mask = tmp_path / "rgb.png"
    Image.new("RGB", (DOG_SIZE[1], DOG_SIZE[0]), (128, 0, 0)).save(rgb_mask)
    with pytest.raises(ValueError, match="--mask.*rgb.png"):
        run_demo(dog / "frames", rgb_mask, checkpoint, out)
    stray = tmp_path / "stray"
    stray.mkdir()
    write_label_png(stray / "00099.png", read_label_png(dog / "mask.png"))
    with pytest.raises(ValueError, match="--mask.*00099"):
        run_demo(dog / "frames", stray, checkpoint, out)
    video = ["--video", str(dog / "frames"), "--model", str(checkpoint)]
    for argv in ([*video],  # --mask is required
                 [*video, "--mask", str(dog / "mask.png"), "--batch-sequences", "2"],  # a main-job flag
                 [*video, "--mask", str(dog / "mask.png"), "--TH", "1.0,0.7"],  # one threshold with --video
                 [*video, "--mask", str(dog / "mask.png"), "--TH", "1.5"],
                 [*video, "--mask", str(dog / "mask.png"), "--max-size", "abc"]):
        assert demo.get_parser(argv).description == demo.video_parser().description
        with pytest.raises(SystemExit):
            demo.get_parser(argv).parse_args(argv)
    with pytest.raises(SystemExit):  # --mask belongs to --video
        demo.get_parser(["--mask", "m.png"]).parse_args(["--mask", "m.png"])
    assert not (out / "masks").exists()  # every error came before any output

    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--video", str(tmp_path / "nope.mp4"),
                           "--mask", str(dog / "mask.png"), "--model", str(checkpoint)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --video")


def test_unusable_out_is_one_error_line(dog, checkpoint, blocked, monkeypatch, capsys):
    argv = ["--video", dog / "frames", "--mask", dog / "mask.png", "--model", checkpoint, "--out", blocked / "x",
            "--dev", "cpu", "--num-aug", "1", "--backbone-weights", "random"]
    code, err = run_script(monkeypatch, capsys, demo.main, demo.video_parser(), argv)
    assert_output_error(code, err, blocker=blocked)
    assert "--out" in err
