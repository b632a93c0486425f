"""Benchmarks compare numbers measured in the same run, never stored timings (and they run)."""
from __future__ import annotations

import ast
import re

import pytest

from benchmarks import precision_fidelity, precision_ops, tracker_speed, train_speed

from conftest import ROOT

TIMING_NAME = re.compile(r"(^|_)(ms|fps|sec|secs|seconds|time|times|timing|timings|speed|reference|upstream|"
                         r"baseline)(_|$)", re.IGNORECASE)


def stored_timings(source: str) -> list[str]:
    """Module- or class-level assignments that store numbers under a timing-like name, or tables
    (dict / list / tuple literals) holding several numbers: where stored reference timings live."""
    found = []

    def numbers(node) -> int:
        return sum(isinstance(n, ast.Constant) and type(n.value) in (int, float) for n in ast.walk(node))

    def visit(body):
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body)
            if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            table = isinstance(node.value, (ast.Dict, ast.List, ast.Tuple, ast.Set)) and numbers(node.value) >= 2
            if numbers(node.value) and (table or any(TIMING_NAME.search(n) for n in names)):
                found.append(f"line {node.lineno}: {', '.join(names)}")
    visit(ast.parse(source).body)
    return found


def test_the_check_finds_stored_timings():
    assert stored_timings('UPSTREAM_MS = {("resnet18", 1): (403, 338), ("resnet18", 2): (763, 745)}\n')
    assert stored_timings("REF = [0.41, 0.34]\n")
    assert stored_timings("class Ref:\n    upstream_ms: float = 690.0\n")
    assert not stored_timings('COLUMNS = ("backbone", "obj")\nWARMUP = 1\n')


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_no_stored_reference_timings(path):
    assert stored_timings(path.read_text()) == [], f"{path.name} stores numbers a comparison could be made against"


def test_tracker_speed_compares_within_one_run(capsys):
    args = tracker_speed.get_parser().parse_args(["--size", "64x112", "--frames", "3", "--repeats", "1",
                                                  "--configs", "resnet18:1", "--threads", "1"])
    m = tracker_speed.main(args)[("resnet18", 1, "fp32")]
    assert set(m) == {"FRTM", "computed", "reused"}
    assert m["reused"]["reuse_rate"] == 1 and m["computed"]["reuse_rate"] == 0 == m["FRTM"]["reuse_rate"]
    # Reusing skips the high backbone and the deep decoder; plain FRTM skips the gate.
    assert m["reused"]["gflops"] < m["FRTM"]["gflops"] < m["computed"]["gflops"]
    out = capsys.readouterr().out
    assert "reuse/comp" in out and "FRTM/reuse" in out and "vs upstream" not in out


def test_tracker_speed_compares_precisions_side_by_side(capsys):
    args = tracker_speed.get_parser().parse_args(["--size", "64x112", "--frames", "3", "--repeats", "1",
                                                  "--configs", "resnet18:1", "--threads", "1",
                                                  "--precision", "fp32,bf16"])
    measured = tracker_speed.main(args)
    assert set(measured) == {("resnet18", 1, "fp32"), ("resnet18", 1, "bf16")}
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("resnet18")]
    assert [r[-3] for r in rows] == ["fp32", "bf16"] and rows[0][-2:] == ["1.00x", "1.00x"]
    with pytest.raises(SystemExit):
        tracker_speed.get_parser().parse_args(["--precision", "fp32,fp64"])


def test_train_speed_alternates(capsys):
    import torch

    before = torch.get_num_threads()
    threads = 1 if before != 1 else 2  # differs from the test's own count
    args = train_speed.get_parser().parse_args(["--size", "64x96", "--batch", "1", "--frames", "2", "--steps", "1",
                                                "--threads", str(threads)])
    train_speed.main(args)
    out = capsys.readouterr().out
    assert "speed-up:" in out and "samples/s" in out
    assert f"{threads} CPU threads" in out and torch.get_num_threads() == before  # run on --threads, then undone


def test_precision_fidelity_compares_with_the_reference(tmp_path, capsys):
    import torch

    from dataset.synthetic import make_davis_like
    from models.network import GFRTM

    make_davis_like(tmp_path / "davis", num_sequences=1, num_frames=4, size=(64, 112), num_objects=2, seed=0)
    torch.manual_seed(0)
    torch.save({"format": "reuse-vos", "backbone": "resnet18", "model": GFRTM("resnet18").state_dict()},
               tmp_path / "model.pth")
    args = precision_fidelity.get_parser().parse_args([
        "--model", str(tmp_path / "model.pth"), "--davis-root", str(tmp_path / "davis"), "--num-aug", "1",
        "--backbone-weights", "random", "--threads", "1", "--precision", "fp32,fp32"])
    out = precision_fidelity.main(args)
    same = out["fp32"]  # fp32 against itself: identical decisions and labels
    assert same["gate_agreement"] == 1 and same["J_vs_reference"] == 1 and same["J&F_diff_points"] == 0
    assert "gates agree" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--precision needs a reference"):
        precision_fidelity.main(precision_fidelity.get_parser().parse_args(
            ["--model", "m.pth", "--davis-root", str(tmp_path / "davis"), "--precision", "bf16"]))


def test_tracker_speed_times_a_checkpoint_against_th_1(tmp_path, capsys):
    import torch
    from models import GFRTM, save_checkpoint
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "net.pth", GFRTM("resnet18").eval())
    args = tracker_speed.get_parser().parse_args(["--size", "64x112", "--frames", "3", "--repeats", "1",
                                                  "--configs", "resnet18:1", "--threads", "1", "--model", str(path),
                                                  "--backbone-weights", "random", "--TH", "0.0"])
    m = tracker_speed.main(args)[("resnet18", 1, "fp32")]
    assert m["model TH 1.0"]["reuse_rate"] == 0 and m["model TH 0"]["reuse_rate"] == 1  # TH 0: p > 0 always reuses
    assert "TH vs 1.0" in capsys.readouterr().out


def test_precision_ops_splits_the_frame_by_operator(capsys):
    """Per precision: convolutions and everything else add up to the frame; the convolutions'
    shapes are those of the network (the stem's 7x7 on the frame, ResNet-18's 512-channel 3x3)."""
    args = precision_ops.get_parser().parse_args(["--size", "64x112", "--frames", "2", "--top", "3", "--threads", "1",
                                                  "--precision", "fp32,bf16"])
    out = precision_ops.main(args)
    assert set(out) == {"fp32", "bf16"}
    for p in out.values():
        assert p["conv"] > 0 and p["other"] > 0
        assert abs(sum(p["shapes"].values()) - p["conv"]) < 1e-6 * max(1.0, p["conv"])
        assert ((3, 64, 112), (64, 3, 7, 7)) in p["shapes"] and ((512, 2, 4), (512, 512, 3, 3)) in p["shapes"]
    printed = capsys.readouterr().out
    assert re.search(r"^convolutions +[\d.]+ +1\.00x +[\d.]+ +[\d.]+x", printed, flags=re.M)
    assert len(re.findall(r"^  +\d+x\d+x\d+ +\d+x\d+x\d+x\d+ ", printed, flags=re.M)) == 3


def test_throughput_counts_ops_at_tiny_size(capsys):
    """benchmarks.throughput runs; a start costs more ops than a tracked frame, a reused frame
    fewer than a computed one, and ops per object start shrink when objects start together."""
    from benchmarks import throughput
    args = throughput.get_parser().parse_args(["--size", "64x96", "--num-aug", "1", "--objects", "1,2",
                                               "--frames", "3", "--sequences", "2", "--batch", "2", "--repeats", "1"])
    out = throughput.main(args)
    one = out[1]
    assert one["start"] > one["frame"] > one["reused"] > 0
    assert out[2]["start"] < one["start"]
    # in lockstep backbone, gate, decoder and merge run once per step for both sequences
    b1, b2 = one["batches"][1], one["batches"][2]
    assert b2["sequence_frame"] < 0.75 * b1["sequence_frame"]
    assert b1["sequence_frame"] < b1["with_starts"] and b2["sequence_frame"] < b2["with_starts"]
    printed = capsys.readouterr().out
    assert "start/obj" in printed and re.search(r"B=2 / B=1: seq-frame ops [\d.]+x, wall FPS [\d.]+x", printed)
