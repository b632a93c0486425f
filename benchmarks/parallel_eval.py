"""One process vs N torchrun processes on the same evaluation (not a test).

    python -m benchmarks.parallel_eval [--davis-root ../shared/data/davis-sample] [--nproc 2] [--dev cpu|cuda]

Runs `evaluate.py --dset dv2017val` once as a single process and once under
`torchrun --standalone --nproc_per_node=N` (gloo on CPU, NCCL on CUDA), both with
OMP_NUM_THREADS=1 per process (torchrun's default; CPU kernels sum in another order with
another thread count), into separate output roots; then checks that every PNG is
byte-identical and J&F equal, and prints both wall times (process start to exit) and their
ratio. The checkpoint is a random G-FRTM whose mask and gate logits are stretched so that the
masks are not trivial and both gate paths are taken (speed does not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from lib.cli import add_device_flag, add_num_aug_flag, int_at_least

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path) -> Path:
    """Random ResNet-18 G-FRTM, rescaled so its outputs are not constant: the mask logits are
    stretched around their median (non-trivial masks) and the reuse-gate logits around p = 0.5
    (with TH 0.5 both the reuse and the compute path are taken)."""
    from models.checkpoint import save_checkpoint
    from models.network import GFRTM

    torch.manual_seed(0)
    net = GFRTM("resnet18").eval()
    with torch.no_grad():
        up = net.upsampler.conv2
        up.weight.mul_(400.0)
        up.bias.copy_(400.0 * (up.bias + 0.0418))
        gate = net.reuse_gate.conv2
        gate.weight.mul_(200.0)
        gate.bias.mul_(200.0)
        gate.bias[0] -= 200.0 * 0.098
    save_checkpoint(path, net)
    return path


def run(nproc: int, checkpoint: Path, out: Path, davis_root: Path, dev: Optional[str], num_aug: int) -> float:
    """Wall seconds of one evaluation (1 process: plain python; N: torchrun)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    cmd = launcher + [str(ROOT / "evaluate.py"), "--model", str(checkpoint), "--backbone-weights", "random",
                      "--num-aug", str(num_aug), "--dset", "dv2017val", "--davis-root", str(davis_root),
                      "--output-root", str(out), "--TH", "0.5"] + (["--dev", dev] if dev else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="1 process vs N torchrun processes: identical outputs, wall times")
    parser.add_argument("--davis-root", type=Path, default=ROOT.parent / "shared" / "data" / "davis-sample",
                        help="DAVIS root (default: ../shared/data/davis-sample)")
    parser.add_argument("--nproc", type=int_at_least(2), default=2, help="processes of the parallel run (default 2)")
    add_device_flag(parser)
    add_num_aug_flag(parser, default=1)
    return parser


def main(args: argparse.Namespace) -> None:

    work = Path(tempfile.mkdtemp(prefix="parallel_eval."))
    checkpoint = make_checkpoint(work / "rn18.pth")
    walls, dirs = {}, {}
    for nproc in (1, args.nproc):
        out = work / f"np{nproc}"
        out.mkdir()
        walls[nproc] = run(nproc, checkpoint, out, args.davis_root, args.dev, args.num_aug)
        dirs[nproc] = out / "result" / "dv2017val-rn18_0.5_fast"
    pngs = {n: {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.glob("*/*.png"))} for n, d in dirs.items()}
    results = {n: json.loads((d / "results.json").read_text()) for n, d in dirs.items()}
    one, many = results[1], results[args.nproc]
    print(f"data: {args.davis_root} (dv2017val: {', '.join(one['sequences'])}; {one['frames']} frames), "
          f"device {args.dev or 'default'}, OMP_NUM_THREADS=1 per process")
    print(f"PNGs byte-identical: {pngs[1] == pngs[args.nproc]} ({len(pngs[1])} files)")
    print(f"J&F: 1 process {one['J&F']!r}, {args.nproc} processes {many['J&F']!r}, equal: {one['J&F'] == many['J&F']}")
    print(f"wall time: 1 process {walls[1]:.1f} s, {args.nproc} processes {walls[args.nproc]:.1f} s "
          f"(ratio {walls[1] / walls[args.nproc]:.2f}x); tracker FPS {one['fps']:.2f} vs {many['fps']:.2f}, "
          f"wall FPS {one['wall_fps']:.2f} vs {many['wall_fps']:.2f}")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main(get_parser().parse_args())
