"""Overlays, MP4 / GIF writers, the reuse timeline and the visualize.py CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

import visualize as vis_cli
from lib.image_io import write_label_png
from lib.palette import DAVIS_PALETTE
from evaluation.results import TrackingStats, load_timeline, write_timeline
from evaluation.visuals import (ABSENT, COMPUTED, GIVEN, REUSED, TIMELINE_COLOURS, GifWriter, Mp4Writer,
                           draw_timeline, list_sequences, object_boundaries, overlay,
                           save_timeline_png, timeline_layout, timeline_states)

from conftest import ROOT, assert_output_error, run_script


def _labels(h=40, w=60):
    labels = np.zeros((h, w), np.uint8)
    labels[5:25, 5:25] = 1
    labels[10:30, 30:55] = 2
    labels[28:38, 2:12] = 7
    return labels


def test_overlay_colours_match_palette():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    labels = _labels()
    out = overlay(image, labels, alpha=0.5, contour_width=1)
    edge = object_boundaries(labels, 1)
    inside = (labels > 0) & ~edge
    expected = np.round(0.5 * image.astype(np.float32) + 0.5 * DAVIS_PALETTE[labels].astype(np.float32))
    np.testing.assert_array_equal(out[inside], expected[inside].astype(np.uint8))
    np.testing.assert_array_equal(out[edge], DAVIS_PALETTE[labels][edge])
    np.testing.assert_array_equal(out[labels == 0], image[labels == 0])
    # Every object has a boundary, drawn in its own colour.
    for obj_id in (1, 2, 7):
        assert (edge & (labels == obj_id)).any()
    # Opaque: the palette colour everywhere on the objects.
    solid = overlay(image, labels, alpha=1.0, contour=False)
    np.testing.assert_array_equal(solid[labels > 0], DAVIS_PALETTE[labels][labels > 0])
    assert tuple(DAVIS_PALETTE[1]) == (128, 0, 0) and tuple(DAVIS_PALETTE[2]) == (0, 128, 0)


def test_object_boundaries_ring():
    labels = np.zeros((20, 20), np.uint8)
    labels[5:15, 5:15] = 3
    edge = object_boundaries(labels, 1)
    ring = np.zeros_like(edge)
    ring[5:15, 5:15] = True
    ring[6:14, 6:14] = False
    np.testing.assert_array_equal(edge, ring)
    # Objects touching the image border: the border itself is no boundary.
    full = np.full((10, 10), 2, np.uint8)
    assert not object_boundaries(full, 1).any()


def test_overlay_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in size"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))


def test_mp4_writer_pads_odd_sizes(tmp_path):
    path = tmp_path / "a.mp4"
    with Mp4Writer(path, fps=5) as writer:
        for i in range(3):
            writer.write(np.full((31, 45, 3), 60 * i, np.uint8))
        with pytest.raises(ValueError, match="differs"):
            writer.write(np.zeros((30, 45, 3), np.uint8))
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 3
    assert frames[0].shape == (32, 46, 3)
    assert abs(float(frames[2].mean()) - 120) < 8


def test_gif_writer_caps_width_and_frames(tmp_path):
    path = tmp_path / "a.gif"
    writer = GifWriter(path, fps=10, max_width=100, max_frames=4)
    for i in range(10):
        writer.add(np.full((60, 300, 3), 20 * i, np.uint8))
    writer.close()
    with Image.open(path) as im:
        assert im.size == (100, 20)
        assert im.n_frames <= 4
        assert im.info["loop"] == 0
        assert im.info["duration"] == 400  # every 4th frame kept, each shown 4 x 100 ms
        im.seek(1)
        assert abs(float(np.asarray(im.convert("RGB")).mean()) - 80) < 3  # frame 4 of 10


PATTERN = [  # objects 1 (mask given at frame 0) and 2 (given at frame 2)
    {"frame": "00000", "reused": {}},
    {"frame": "00001", "reused": {"1": True}},
    {"frame": "00002", "reused": {"1": False}},
    {"frame": "00003", "reused": {"1": True, "2": False}},
    {"frame": "00004", "reused": {"1": False, "2": True}},
]
EXPECTED_STATES = [[GIVEN, REUSED, COMPUTED, REUSED, COMPUTED],
                   [ABSENT, ABSENT, GIVEN, COMPUTED, REUSED]]


def test_timeline_states_and_rate():
    ids, states = timeline_states(PATTERN)
    assert ids == [1, 2]
    np.testing.assert_array_equal(states, EXPECTED_STATES)
    stats = TrackingStats.from_timeline(PATTERN)
    assert (stats.reused, stats.tracked) == (3, 6)


def test_timeline_image_cells(tmp_path):
    image = draw_timeline({"fps": 12.5, "frames": PATTERN}, "seq")
    layout = timeline_layout(5, 2)
    assert image.size == (layout.width, layout.height)
    assert image.mode == "RGB"
    for row, states in enumerate(EXPECTED_STATES):
        for t, state in enumerate(states):
            x, y = layout.cell_centre(row, t)
            assert image.getpixel((x, y)) == TIMELINE_COLOURS[state], (row, t)
    # Long videos: cells shrink (down to a pixel), rows and the legend stay.
    long = [{"frame": f"{t:05d}", "reused": {"1": bool(t % 3)} if t else {}} for t in range(1500)]
    big = draw_timeline({"fps": 3.0, "frames": long})
    assert big.size == (timeline_layout(1500, 1).width, timeline_layout(1500, 1).height)
    assert timeline_layout(1500, 1).cell_w == 1
    # No objects at all still draws.
    empty = draw_timeline({"fps": None, "frames": [{"frame": "0", "reused": {}}]})
    assert empty.size == (timeline_layout(1, 0).width, timeline_layout(1, 0).height)


def test_timeline_json_roundtrip(tmp_path):
    path = tmp_path / "timeline.json"
    def prob(reused: bool) -> float:
        return 0.9 if reused else 0.1234567  # written rounded to 1e-6
    frames = [{"frame": f["frame"], "reused": {int(k): v for k, v in f["reused"].items()},
               "reuse_prob": {int(k): prob(v) for k, v in f["reused"].items()}} for f in PATTERN]
    frames[0].pop("reuse_prob")  # optional (timelines written before it existed)
    write_timeline(path, 12.5, frames)
    data = json.loads(path.read_text())
    expected = [{**f, "reuse_prob": {k: round(prob(v), 6) for k, v in f["reused"].items()}} for f in PATTERN]
    expected[0]["reuse_prob"] = {}
    assert data == {"fps": 12.5, "frames": expected}
    assert load_timeline(path) == data
    save_timeline_png(tmp_path / "t.png", data, "x")
    with Image.open(tmp_path / "t.png") as im:
        assert im.size == (timeline_layout(5, 2).width, timeline_layout(5, 2).height)
    (tmp_path / "bad.json").write_text('{"frames": [{"frame": "0"}]}')
    with pytest.raises(ValueError, match="bad.json"):
        load_timeline(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_timeline(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# visualize.py CLI


@pytest.fixture
def fake_results(tmp_path):
    """frames/<seq>/*.jpg and result/<name>/<seq>/*.png, seqA with a timeline.json."""
    rng = np.random.default_rng(1)
    frames_dir, results = tmp_path / "frames", tmp_path / "result" / "run"
    for seq in ("seqA", "seqB"):
        (frames_dir / seq).mkdir(parents=True)
        (results / seq).mkdir(parents=True)
        for t in range(3):
            image = rng.integers(90, 110, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(frames_dir / seq / f"{t:05d}.jpg", quality=95)
            labels = np.zeros((48, 64), np.uint8)
            labels[10:40, 8 + 4 * t:40 + 4 * t] = 1
            labels[2:12, 48:62] = 2
            write_label_png(results / seq / f"{t:05d}.png", labels)
    write_timeline(results / "seqA" / "timeline.json", 20.0, PATTERN[:3])
    (results / "results.json").write_text("{}")
    return frames_dir, results


def test_visualize_cli(fake_results, tmp_path):
    frames_dir, results = fake_results
    args = vis_cli.get_parser().parse_args(["--results", str(results), "--frames", str(frames_dir)])
    written = vis_cli.main(args)
    out = results / "vis"
    assert sorted(written) == ["seqA", "seqB"]
    assert (out / "seqA" / "timeline.png").is_file() and not (out / "seqB" / "timeline.png").exists()
    for seq in ("seqA", "seqB"):
        capture = cv2.VideoCapture(str(out / seq / "overlay.mp4"))
        count = 0
        while capture.read()[0]:
            count += 1
        capture.release()
        assert count == 3
        with Image.open(out / seq / "overlay.gif") as im:
            assert im.n_frames == 3 and im.size == (64, 48)
            rgb = np.asarray(im.convert("RGB")).astype(int)
        # Inside object 1 of frame 0: half frame (~100), half (128, 0, 0); GIF quantization aside.
        assert np.abs(rgb[25, 20] - np.array([114, 50, 50])).max() <= 12
        # Object 2 in the corner: green.
        assert rgb[7, 55, 1] > rgb[7, 55, 0] + 30
    with Image.open(out / "seqA" / "timeline.png") as im:
        assert im.size == (timeline_layout(3, 1).width, timeline_layout(3, 1).height)
    # Running again does not take the vis/ folder for a sequence; flags switch outputs off.
    out2 = tmp_path / "vis2"
    args = vis_cli.get_parser().parse_args(["--results", str(results), "--frames", str(frames_dir),
                                            "--sequences", "seqB", "--out", str(out2), "--no-gif"])
    assert list(vis_cli.main(args)) == ["seqB"]
    assert (out2 / "seqB" / "overlay.mp4").is_file() and not (out2 / "seqB" / "overlay.gif").exists()
    assert list_sequences(results) == ["seqA", "seqB"]


def test_visualize_cli_errors(fake_results, tmp_path):
    frames_dir, results = fake_results
    parse = vis_cli.get_parser().parse_args
    with pytest.raises(FileNotFoundError, match="--results"):
        vis_cli.main(parse(["--results", str(tmp_path / "nope"), "--frames", str(frames_dir)]))
    with pytest.raises(FileNotFoundError, match="--sequences"):
        vis_cli.main(parse(["--results", str(results), "--frames", str(frames_dir), "--sequences", "seqZ"]))
    with pytest.raises(ValueError, match="--out"):
        vis_cli.main(parse(["--results", str(results), "--frames", str(frames_dir), "--out", str(results)]))
    (frames_dir / "seqA" / "00002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="00002"):
        vis_cli.main(parse(["--results", str(results), "--frames", str(frames_dir), "--sequences", "seqA"]))
    proc = subprocess.run([sys.executable, str(ROOT / "visualize.py"), "--results", str(results),
                           "--frames", str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --frames")


def test_unusable_out_is_one_error_line(fake_results, blocked, monkeypatch, capsys):
    from evaluation.sweep import CURVE_COLUMNS, write_curve

    frames_dir, results = fake_results
    rows = [{**{c: 1.0 for c in CURVE_COLUMNS}, "tau": tau, "J&F": jf, "fps": fps, "results_dir": ""}
            for tau, jf, fps in ((1.0, 0.6, 10.0), (0.7, 0.55, 14.0))]
    write_curve(results / "sweep", rows, {})
    for argv in (["--results", results, "--frames", frames_dir, "--out", blocked / "vis"],
                 ["curve", results / "sweep", "--out", blocked / "curves.png"]):
        code, err = run_script(monkeypatch, capsys, vis_cli.main, vis_cli.get_parser(), argv)
        assert_output_error(code, err, blocker=blocked)
