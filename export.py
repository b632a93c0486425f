"""Export a G-FRTM / FRTM checkpoint to ONNX graphs, for the runtime without PyTorch (`deploy/`).

    python export.py --model CKPT --out DIR [--backbone-weights imagenet|PATH] [--no-fast] [--num-aug N]
                     [--int8 --calibrate FRAMES_OR_VIDEO ...]

DIR receives one ONNX file per graph of `models.graphs` (backbone stages, template matching and
reuse gate, both decoders, target-model scores, first-frame fit, memory encoding, filter
re-optimisation, probability merge; opset 18; frame size, object count and memory length are
dynamic axes) and manifest.json (`lib.manifest`): the checkpoint's sha256, the target-model
settings, opset, input and output names, the versions. docs/deployment.md says what stays in
host code and why. Needs requirements-export.txt (onnx, onnxscript); onnxruntime checks nothing
here but is what runs the graphs, and with --int8 it quantises the convolution-heavy graphs
(`quantize_graphs`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from lib.cli import (UsageError, add_backbone_weights_flag, add_fast_flag, add_num_aug_flag, add_seed_flag,
                     add_threads_flag, cpu_threads, int_at_least, run)
from lib.fileio import atomic_write_bytes, creating, make_dirs, make_temp_dir
from lib.image_io import resize_image_area
from lib.manifest import FORMAT, FORMAT_VERSION, MANIFEST, file_sha256, read_manifest
from lib.video_io import open_frames, processing_size

OPSET = 18
# The traced example's frame size; every size runs (dynamic axes). Not a multiple of 4, 8, 16 or 32:
# where the trace finds a feature map already at its target size it skips the resize, and the
# graph would keep that as a relation between the axes (the decoder's output at 4 x its input).
EXAMPLE_SIZE = (117, 211)
# int8 calibration: frames are tracked at this shorter side at most (as demo.py's --max-size), with
# one object started from a box over the first frame's central half; once with every object
# computing (TH 1: backbone_high, decode_computed) and once with every object reusing (TH 0: gate,
# decode_reused), so that each quantised graph sees its inputs on every calibration frame.
CALIBRATION_SIZE = 480
# The operators --int8 quantises (their inputs and weights): the convolutions and matrix products.
# The rest stays fp32, the gate's probability and the decoders' outputs included (quantised, the
# probability moved in steps of 1/255 and flipped decisions next to the threshold).
INT8_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a G-FRTM/FRTM checkpoint to ONNX graphs and a manifest, for `python -m deploy` "
                    "(onnxruntime, no PyTorch). docs/deployment.md.")
    parser.add_argument("--model", required=True, help="G-FRTM or FRTM checkpoint (.pth) to export")
    parser.add_argument("--out", required=True,
                        help="folder to write the graphs (*.onnx) and manifest.json into; an existing export there "
                             "is replaced only once the new one is complete")
    add_backbone_weights_flag(parser)
    add_fast_flag(parser)
    add_num_aug_flag(parser, 5)
    add_seed_flag(parser)
    add_threads_flag(parser, 2, " while exporting")
    parser.add_argument("--int8", action="store_true",
                        help="quantise the convolution-heavy graphs (backbone, decoders, template matching and gate) "
                             "to int8 (static QDQ, per-channel weights); needs --calibrate. The target models, the "
                             "solver and the merge stay fp32")
    parser.add_argument("--calibrate", type=Path, nargs="+", default=None, metavar="FRAMES_OR_VIDEO",
                        help="with --int8: frame folders or videos whose frames calibrate the activations' ranges "
                             "(frames like those the export will track)")
    parser.add_argument("--calibration-frames", type=int_at_least(1), default=8,
                        help="with --int8: frames used of each --calibrate source, from its start (default 8)")
    return parser


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    model: Path
    out: Path
    backbone_weights: str
    fast: bool
    num_aug: int
    seed: int
    threads: int | None
    calibrate: tuple[Path, ...] = ()  # with --int8; empty: fp32
    calibration_frames: int = 8


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    """Checks the flags that need no PyTorch work; raises FileNotFoundError / UsageError."""
    model = Path(args.model).expanduser()
    if not model.is_file():
        raise FileNotFoundError(f"--model: checkpoint not found: {model}")
    bw = args.backbone_weights
    if bw.lower() not in ("imagenet", "random", "none") and not Path(bw).expanduser().is_file():
        raise FileNotFoundError(f"--backbone-weights: no such file: {bw} (or use 'imagenet' / 'random')")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UsageError(f"--out: {out} is a folder with files but no {MANIFEST} (not an earlier export, which "
                         f"would be replaced): choose a new or empty folder")
    calibrate = tuple(Path(p).expanduser() for p in args.calibrate or ())
    if args.int8 and not calibrate:
        raise UsageError("--int8 needs --calibrate FRAMES_OR_VIDEO ...: frames whose activations set the int8 ranges")
    if calibrate and not args.int8:
        raise UsageError("--calibrate is used only with --int8")
    for source in calibrate:
        open_frames(source, flag="--calibrate")  # a missing or empty source: one error now, before the export
    return ExportConfig(model, out, bw, args.fast, args.num_aug, args.seed, args.threads, calibrate,
                        args.calibration_frames)


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _example_inputs(regions, config, size: tuple[int, int]) -> dict:
    """Inputs of each graph for tracing: 2 objects, 3 samples, 4 memory slots (distinct from 1 and
    from each other, so that no axis is specialised)."""
    import torch

    from models.graphs import BackboneHigh, BackboneLow

    h, w = size
    n, k, slots, c = 2, 3, 4, config.channels
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        layer2, layer3 = BackboneLow(regions)(image)
        layer4, layer5 = BackboneHigh(regions)(layer3)
    h16, w16 = layer4.shape[-2:]
    c4 = layer4.shape[1]

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    score = rand(n, 1, h16, w16)
    masks = (rand(n, 1, h, w) > 0.5).float()
    return {
        "backbone_low": (image,), "backbone_high": (layer3,),
        "target_scores": (layer4, rand(n, c, c4), rand(n, c, 9)),
        "gate": (layer3, score, rand(n, 64, 64)),
        "decode_computed": (image, layer2, layer3, layer4, layer5, score),
        "decode_reused": (image, layer2, layer3, rand(n, 64, *layer3.shape[-2:]), score, rand(n, 64, h16, w16)),
        "object_start": (layer2, layer3, layer4, layer5, masks, score),
        "target_init": (rand(n, k, c4, h16, w16), (rand(n * k, 1, h, w) > 0.5).float(),
                        torch.tensor([0.5, 0.25, 0.25])),
        "memory_encode": (rand(n, 1, h, w), score),
        "optimize_filters": (rand(n, slots, h16 * w16, c), rand(n, slots, 9, h16, w16), rand(n, slots, 1, h16, w16),
                             rand(n, slots), rand(n, 9 * c), rand(n, 9 * c), rand(n, 1), rand(n, 9 * c)),
        "merge": (rand(1 + n, h, w),),
    }


def export_graphs(cfg: ExportConfig, folder: Path, log=print) -> dict:
    """Write the graphs of `cfg.model` into `folder` -> the manifest's "graphs" and model fields."""
    import torch
    from torch.export import Dim

    from models.backbone import Backbone
    from models.checkpoint import build_network
    from models.graphs import GRAPHS, graph_modules
    from models.target_model import TargetModelConfig
    from models.tracker import build_regions

    try:
        network, _ = build_network(str(cfg.model))
    except KeyError as exc:  # no decoder keys: not a G-FRTM/FRTM checkpoint
        raise UsageError(f"--model: {cfg.model}: {exc.args[0]}") from exc
    backbone = Backbone(network.backbone_name, cfg.backbone_weights, seed=cfg.seed).fuse_batch_norm()
    config = TargetModelConfig.evaluation(cfg.fast)
    forget_factor = (1 - config.precond_lr) ** config.cg_forgetting_rate
    regions = build_regions(network.eval(), backbone, torch.device("cpu"))  # the tracker's eager steps
    modules = graph_modules(regions, config, cfg.seed, forget_factor)
    examples = _example_inputs(regions, config, EXAMPLE_SIZE)
    graphs = {}
    for name, module in modules.items():
        spec = GRAPHS[name]
        outputs = tuple(o for o in spec.outputs if network.has_gate or o != "template")
        dynamic = {arg: {axis: Dim.DYNAMIC for axis in axes} for arg, axes in spec.inputs.items()}
        path = folder / f"{name}.onnx"
        start = time.perf_counter()
        torch.onnx.export(module, examples[name], str(path), input_names=list(spec.inputs), output_names=list(outputs),
                          dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, external_data=False,
                          optimize=False, verbose=False)  # onnxruntime optimizes at load; the exporter's
        # own optimizer took 5-7x longer (the unrolled Gauss-Newton graphs) for no measured gain
        log(f"  {name}: {path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s", flush=True)
        graphs[name] = {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
                        "inputs": list(spec.inputs), "outputs": list(outputs), "precision": "fp32"}
    return {"backbone": network.backbone_name, "has_gate": network.has_gate,
            "target_model": {**dataclasses.asdict(config), "fast": cfg.fast}, "graphs": graphs}


def main(args: argparse.Namespace) -> dict:
    cfg = config_from_args(args)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"export.py needs onnx and onnxscript: pip install -r requirements-export.txt ({exc})") from exc
    make_dirs(cfg.out.parent, "the export's parent folder", fix="--out")
    with cpu_threads(cfg.threads):
        staging = make_temp_dir(cfg.out.parent, f".{cfg.out.name}.", ".tmp")
        try:
            print(f"exporting {cfg.model} to {cfg.out} (opset {OPSET})", flush=True)
            exported = export_graphs(cfg, staging)
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                        "checkpoint": {"path": str(cfg.model), "sha256": file_sha256(cfg.model)},
                        "backbone_weights": cfg.backbone_weights, "num_aug": cfg.num_aug, "seed": cfg.seed,
                        "opset": OPSET, "precision": "fp32", **exported, "versions": _versions()}
            atomic_write_bytes(staging / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            if cfg.calibrate:  # the fp32 export tracks the calibration frames, then its graphs are replaced
                manifest = quantize_graphs(staging, cfg.calibrate, cfg.calibration_frames)
            with creating(cfg.out, "the export folder", fix="--out"):
                _replace(staging, cfg.out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {len(manifest['graphs'])} graphs and {MANIFEST} to {cfg.out}")
    return manifest


def calibration_inputs(folder: Path, names, sources, frames_per_source: int) -> dict[str, list[dict]]:
    """Each graph of `names`' inputs while the fp32 export in `folder` tracks the calibration
    frames (see CALIBRATION_SIZE) -> {graph: [inputs by name]}."""
    import numpy as np

    from deploy.runtime import ExportedTracker

    class Recording(ExportedTracker):
        """The runtime, keeping the inputs of the graphs to quantise."""

        def run(self, name: str, **inputs):
            if name in recorded:
                recorded[name].append(inputs)
            return super().run(name, **inputs)

    recorded: dict[str, list[dict]] = {name: [] for name in names}
    tracker = Recording(folder)
    for source in sources:
        frames = open_frames(source, flag="--calibrate")
        size = processing_size(*frames.size, CALIBRATION_SIZE)
        images = []
        for _, rgb in frames:
            images.append(resize_image_area(rgb, size))
            if len(images) == frames_per_source:
                break
        h, w = size
        box = np.zeros(size, np.uint8)
        box[h // 4:h - h // 4, w // 4:w - w // 4] = 1
        for threshold in (1.0, 0.0):
            feed = ((image, box if t == 0 else None, [1] if t == 0 else []) for t, image in enumerate(images))
            for _ in tracker.track(feed, threshold):
                pass
    return recorded


def quantize_graphs(folder: Path, sources, frames_per_source: int, log=print) -> dict:
    """Replace the convolution-heavy graphs (`GraphSpec.quantised`) of the fp32 export in
    `folder` by int8 ones: static QDQ quantisation (onnxruntime.quantization.quantize_static,
    per-channel int8 weights, uint8 activations with MinMax ranges: onnxruntime's fast
    u8 x s8 kernels on x86) after onnxruntime's constant folding, calibrated on the graphs'
    inputs while the export tracks the calibration frames. Rewrites the manifest -> it."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxscript.optimizer import fold_constants

    from models.graphs import GRAPHS

    manifest = read_manifest(folder)
    names = [n for n, spec in GRAPHS.items() if spec.quantised and n in manifest["graphs"]]
    start = time.perf_counter()
    recorded = calibration_inputs(folder, names, sources, frames_per_source)
    log(f"  calibration: {sum(map(len, recorded.values()))} graph runs, {time.perf_counter() - start:.0f} s",
        flush=True)

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    graphs = dict(manifest["graphs"])
    for name in names:
        entry = graphs[name]
        fp32, constant, folded, int8 = (folder / entry["file"], folder / f"{name}.constant.onnx",
                                        folder / f"{name}.folded.onnx", folder / f"{name}.int8.onnx")
        start = time.perf_counter()
        # The exporter writes a convolution without bias (the decoders' bias=False convolutions) as
        # Conv(x, w, Expand(Cast(0), C)), which onnxruntime's optimiser leaves computed; fold such
        # constant subgraphs first, so that every bias is an initializer that quantize_static can
        # quantise (else it warns "Expected bias ... to be an initializer" and keeps the subgraph).
        model = onnx.load(str(fp32))
        fold_constants(model)
        onnx.save(model, str(constant))
        # then onnxruntime's own graph optimisation (batch norms into convolutions: biases become initializers)
        quant_pre_process(str(constant), str(folded), skip_symbolic_shape=True)
        quantize_static(str(folded), str(int8), Reader(recorded[name]), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS)
        constant.unlink()
        folded.unlink()
        int8.replace(fp32)
        log(f"  {name}: int8, {fp32.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s", flush=True)
        graphs[name] = {**entry, "sha256": file_sha256(fp32), "bytes": fp32.stat().st_size, "precision": "int8"}
    calibration = {"sources": [str(s) for s in sources], "frames_per_source": frames_per_source,
                   "max_size": CALIBRATION_SIZE, "method": "static QDQ, per-channel int8 weights, uint8 activations, "
                                                           "MinMax", "graph_runs": {n: len(recorded[n]) for n in names}}
    manifest = {**manifest, "precision": "int8", "graphs": graphs, "calibration": calibration}
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _replace(staging: Path, out: Path) -> None:
    """Move the complete export in place of `out` (an earlier export there is removed only now)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


if __name__ == "__main__":
    run(main, get_parser())
