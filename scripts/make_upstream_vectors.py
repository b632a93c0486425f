"""Write tracker conformance vectors (golden/README.md's `rn18_tracker*.pt` format) by running
upstream's own tracker (a checkout of HYOJINPARK/Reuse_VOS given by --upstream) on synthetic
sequences, on the CPU.

    python scripts/make_upstream_vectors.py --upstream /path/to/Reuse_VOS --out tests/golden_upstream

For each case: random but fixed weights (our seeded network exported in upstream's key layout),
a seeded ResNet-18 backbone (`backbone_seed`, `backbone_checksum`), and a synthetic sequence.
The reuse threshold is moved into the widest gap between the reuse probabilities upstream
produces with it, until it sits there. The vector is upstream's run with `--threads` torch
threads; `tolerance` is twice the largest difference between it and upstream's runs with each of
`--spread-threads` (gates must not change), floored at 1e-3 / 1e-3 / 1e-4 (scores, logits,
label_tie). `label_tie`'s difference is the largest decision margin (README's merge rule, from
the vector's logits) at a pixel whose label another thread count changes.

Upstream runs in a subprocess of this script (`--worker`), with upstream's directory first on
its path and nothing of ours imported (both have a top-level `lib`). There, its CUDA-only NPP
extension is replaced by an empty module (its CPU path warps with OpenCV), the missing
`easydict` by a dictionary with attribute access, `lib.evaluation` (which needs scikit-image,
and is not used) by an empty module, `torch.cuda.synchronize` by a no-op, `TensorList`'s apparent
`__torch_function__` (it forwards every tensor attribute; newer torch then refuses its lists in
`torch.autograd.grad`) hidden, and torchvision's
pretrained ResNet by the seeded one.

`num_aug` > 1 is accepted, but such a vector cannot be compared with our tracker: upstream
seeds the legacy global numpy generator (np.random.seed(0)) and draws its augmentations by
shuffling lists and picking among the good frames; ours draws from a numpy Generator in another
order, so the augmented images, and with them the target models, differ.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"scores": 1e-3, "logits": 1e-3, "label_tie": 1e-4}
MIN_GAP = 0.005  # the threshold must sit at least this far from every reuse probability (float noise: ~1e-6)


@dataclass(frozen=True)
class Case:
    """One vector: file name, start frames (frame -> new object ids), frames, image size."""
    name: str
    start_frames: dict
    frames: int = 8
    size: tuple = (120, 216)
    num_aug: int = 1
    fast: bool = True
    render_seed: int = 31


CASES = {
    "late": Case("rn18_tracker_late_alone.pt", {0: [1], 3: [2]}),
    "together": Case("rn18_tracker_late_together.pt", {0: [1], 3: [2, 3]}, render_seed=32),
    "aug5": Case("rn18_tracker_aug5.pt", {0: [1, 2]}, num_aug=5, render_seed=33),
}


def decision_margin(labels: torch.Tensor, starts: dict, raw_before: dict, t: int) -> torch.Tensor:
    """(H, W) margin of frame t's label decision, per golden/README.md: upstream's merge of the
    logits `raw_before` (object id -> {"logits": (1, 1, H, W)}; objects starting at t enter with
    their given mask `labels` (H, W) as probability 1, the tracked objects' probabilities
    multiplied by 1 minus that mask), soft masks s with background first, and with s1 >= s2 the
    two largest: min(s1 - s2, |s1 - 0.5|)."""
    eps = 1e-7
    entering = [(labels == i).double() for i in starts.get(t, [])]
    rows = []
    for _, r in sorted(raw_before.items()):
        p = torch.sigmoid(r["logits"][0, 0].double())
        for mask in entering:
            p = p * (1 - mask)
        rows.append(p)
    p = torch.stack(rows + entering).clamp(eps, 1 - eps)
    background = (1 - p).min(dim=0, keepdim=True).values
    p = torch.cat([background, p])
    s = torch.softmax(p / (1 - p), dim=0)
    top = s.topk(2, dim=0).values
    return torch.minimum(top[0] - top[1], (top[0] - 0.5).abs())


# ---------------------------------------------------------------------------------------------
# Upstream's side (subprocess: nothing of ours imported)


def _run_upstream(args: argparse.Namespace) -> None:
    """Run upstream's tracker on the inputs in args.worker[0]; save its outputs to args.worker[1]."""
    import types

    import torchvision

    upstream = str(Path(args.upstream).resolve())
    sys.path = [upstream] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    torch.set_num_threads(args.threads)
    inputs = torch.load(args.worker[0], weights_only=False)

    class AttrDict(dict):
        """easydict's EasyDict as far as upstream uses it: nested dicts with attribute access."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            for k, v in self.items():
                if isinstance(v, dict) and not isinstance(v, AttrDict):
                    self[k] = AttrDict(v)

        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as e:
                raise AttributeError(key) from e

        def __setattr__(self, key, value):
            self[key] = value

    for name, attrs in (("easydict", {"EasyDict": AttrDict}), ("lib._npp", {"nppig_cpp": None}),
                        ("lib.evaluation", {"evaluate_dataset": None})):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    torch.cuda.synchronize = lambda *a, **k: None

    def seeded_resnet(pretrained=False, **kwargs):
        torch.manual_seed(inputs["backbone_seed"])
        return getattr(torchvision.models, inputs["ftext"])(weights=None)

    import model.feature_extractor
    setattr(model.feature_extractor, inputs["ftext"], seeded_resnet)
    import evaluate as upstream_evaluate
    from lib.tensorlist import TensorList

    # TensorList forwards every attribute torch.Tensor has to its elements, so newer torch takes it
    # for a __torch_function__ override (torch.autograd.grad then refuses it): it has none
    forward_attribute = TensorList.__getattr__

    def tensor_list_attribute(self, name):
        if name == "__torch_function__":
            raise AttributeError(name)
        return forward_attribute(self, name)

    TensorList.__getattr__ = tensor_list_attribute

    params = upstream_evaluate.Parameters(inputs["checkpoint"]["model"], fast=inputs["fast"], device="cpu")
    params.num_aug = params.aug_params.num_aug = inputs["num_aug"]
    tracker = params.get_model()
    clock = [0]
    calls: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    probs: list[float] = []

    class RecordedDecoder(torch.nn.Module):
        """Upstream's decoder, recording each tracked object-frame's gate, scores and logits."""

        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def Test_Init(self, *a):  # noqa: N802 (upstream's name)
            return self.decoder.Test_Init(*a)

        def Test_Forward(self, s, features, gate, *rest):  # noqa: N802
            y, state = self.decoder.Test_Forward(s, features, gate, *rest)
            calls.append((clock[0], int(gate), s.detach().clone(), y.detach().clone()))
            return y, state

    class RecordedGate(torch.nn.Module):
        def __init__(self, select):
            super().__init__()
            self.select = select

        def forward(self, logits):
            out = self.select(logits)
            probs.append(float(out[1][0, 0]))
            return out

    tracker.refiner = RecordedDecoder(tracker.refiner)
    tracker.gSelect = RecordedGate(tracker.gSelect)
    starts = {int(t): [int(i) for i in ids] for t, ids in inputs["start_frames"].items()}

    class Sequence:
        name = "synthetic"
        obj_ids = [i for t in sorted(starts) for i in starts[t]]

        def __len__(self):
            return inputs["images"].shape[0]

        def __getitem__(self, t):
            if t >= len(self):
                raise IndexError(t)
            clock[0] = t
            new = starts.get(t, [])
            labels = []
            if new:  # upstream's dataset keeps only the starting objects in a start frame's labels
                labels = inputs["labels"][t].clone()
                labels[~sum(labels == i for i in new).bool()] = 0
            return inputs["images"][t], labels, new

    # Upstream builds an object's target model before it reseeds the global generator with 0 for
    # that object, so each object's initial weights are the draws after the previous object's
    # reseed; for the first object of a run, after this reseed (ours: every object from seed 0).
    torch.manual_seed(0)
    outputs = tracker.run_sequence(Sequence(), this_th=inputs["threshold"])[0]
    T = inputs["images"].shape[0]
    gates: list[dict] = [{} for _ in range(T - 1)]
    raw: list[dict] = [{} for _ in range(T - 1)]
    order = {t: [i for s in sorted(starts) if s < t for i in starts[s]] for t in range(T)}
    seen: dict[int, int] = {}
    for t, gate, s, y in calls:
        obj = order[t][seen.get(t, 0)]
        seen[t] = seen.get(t, 0) + 1
        gates[t - 1][obj] = gate
        raw[t - 1][obj] = {"scores": s, "logits": y}
    output_labels = torch.stack([o.reshape(o.shape[-2:]).to(torch.uint8) for o in outputs])
    torch.save({"gates": gates, "raw": raw, "output_labels": output_labels, "reuse_probs": probs}, args.worker[1])


# ---------------------------------------------------------------------------------------------
# Our side: inputs, threshold, spread over thread counts, the vector


def _inputs(case: Case, checkpoint_seed: int, backbone_seed: int, gate_gain: float) -> dict:
    import torchvision

    from dataset.synthetic import render_sequence
    from models.checkpoint import to_upstream
    from models.network import GFRTM

    torch.manual_seed(checkpoint_seed)
    checkpoint = {"model": to_upstream(GFRTM("resnet18").state_dict())}
    for key in ("convGS.4.weight", "convGS.4.bias"):  # spread the reuse probabilities (else all ~0.49)
        checkpoint["model"][key] = checkpoint["model"][key] * gate_gain
    torch.manual_seed(backbone_seed)
    backbone = torchvision.models.resnet18(weights=None).state_dict()
    checksum = sum(v.double().sum().item() for k, v in backbone.items()
                   if v.is_floating_point() and not k.startswith("fc."))
    first = {i: t for t, ids in case.start_frames.items() for i in ids}
    images, labels = render_sequence([case.render_seed], case.frames, case.size, len(first),
                                     first_frames=[first[i] for i in sorted(first)])
    return {"ftext": "resnet18", "backbone_seed": backbone_seed, "backbone_checksum": checksum,
            "torch_version": torch.__version__, "fast": case.fast, "num_aug": case.num_aug,
            "checkpoint": checkpoint,
            "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            "labels": torch.from_numpy(labels)[:, None].contiguous(),
            "start_frames": {int(t): list(ids) for t, ids in case.start_frames.items()}}


def _upstream(inputs: dict, threshold: float, threads: int, upstream: Path, work: Path) -> dict:
    """Upstream's outputs for `inputs` at `threshold` with `threads` torch threads."""
    src, dst = work / "inputs.pt", work / f"out_{threads}.pt"
    torch.save(dict(inputs, threshold=threshold), src)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--upstream", str(upstream),
                           "--threads", str(threads), "--worker", str(src), str(dst)],
                          cwd=upstream, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"upstream's tracker failed ({threads} threads):\n{proc.stderr[-4000:]}")
    return torch.load(dst, weights_only=False)


def _widest_gap(probs: list[float]) -> tuple[float, float]:
    """(midpoint, width) of the widest gap between sorted reuse probabilities, such that some
    object-frames reuse and some compute when there are at least two distinct values."""
    values = sorted(set(probs))
    if len(values) < 2:
        return 0.5, 0.0
    width, lo = max((b - a, a) for a, b in zip(values, values[1:]))
    return lo + width / 2, width


def _threshold(inputs: dict, upstream: Path, threads: int, work: Path, tries: int = 6) -> tuple[float, dict]:
    """A threshold in the widest gap of the reuse probabilities upstream produces with it."""
    threshold = 0.5
    for _ in range(tries):
        out = _upstream(inputs, threshold, threads, upstream, work)
        if min(abs(p - threshold) for p in out["reuse_probs"]) >= MIN_GAP:
            middle, _ = _widest_gap(out["reuse_probs"])
            if abs(middle - threshold) < 1e-6 or all(
                    (p > threshold) == (p > middle) for p in out["reuse_probs"]):
                return threshold, out
        threshold, _ = _widest_gap(out["reuse_probs"])
    raise RuntimeError(f"no threshold at least {MIN_GAP} from every reuse probability after {tries} runs")


def spread(vector: dict, other: dict) -> dict:
    """Largest difference of `other` (upstream's run with another thread count) from `vector`:
    scores, logits (max abs) and label_tie (largest decision margin where the labels differ)."""
    if other["gates"] != vector["gates"]:
        raise RuntimeError("a thread count changed a gate: the threshold is too close to a reuse probability")
    out = {"scores": 0.0, "logits": 0.0, "label_tie": 0.0}
    for mine, theirs in zip(vector["raw"], other["raw"]):
        for obj, r in mine.items():
            for key in ("scores", "logits"):
                out[key] = max(out[key], float((r[key] - theirs[obj][key]).abs().max()))
    starts = vector["start_frames"]
    for t in range(1, vector["output_labels"].shape[0]):
        differ = vector["output_labels"][t] != other["output_labels"][t]
        if differ.any():
            margin = decision_margin(vector["labels"][t, 0], starts, vector["raw"][t - 1], t)[differ]
            out["label_tie"] = max(out["label_tie"], float(margin.max()))
    return out


def make_vector(case: Case, upstream: Path, threads: int, spread_threads: list[int], checkpoint_seed: int,
                backbone_seed: int, gate_gain: float) -> dict:
    inputs = _inputs(case, checkpoint_seed, backbone_seed, gate_gain)
    with tempfile.TemporaryDirectory() as tmp:
        threshold, out = _threshold(inputs, upstream, threads, Path(tmp))
        vector = dict(inputs, threshold=threshold, gates=out["gates"], raw=out["raw"],
                      output_labels=out["output_labels"])
        spreads = {n: spread(vector, _upstream(inputs, threshold, n, upstream, Path(tmp))) for n in spread_threads}
    measured = {k: max(s[k] for s in spreads.values()) for k in FLOOR}
    vector["tolerance"] = {k: max(FLOOR[k], float(f"{2 * measured[k]:.2g}")) for k in FLOOR}
    gates = [g for f in vector["gates"] for g in f.values()]
    vector["note"] = (f"made by scripts/make_upstream_vectors.py from upstream's tracker ({threads} threads); "
                      f"spread over {spread_threads} threads {json.dumps(measured)}; "
                      f"gates[i] and raw[i] are for the i-th tracked frame (frame i+1); "
                      f"reused fraction {sum(gates) / len(gates):.2f}")
    return vector


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", type=Path, required=True,
                        help="directory of a checkout of upstream's code (HYOJINPARK/Reuse_VOS)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden_upstream",
                        help="folder the vectors are written to")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["late", "together"],
                        help="which vectors to make (aug5: see the module docstring)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the vector's own run")
    parser.add_argument("--spread-threads", type=int, nargs="+", default=[1, 3, 4],
                        help="thread counts whose difference from the vector gives its tolerance")
    parser.add_argument("--checkpoint-seed", type=int, default=31, help="seed of the random network weights")
    parser.add_argument("--backbone-seed", type=int, default=2, help="seed of the random ResNet-18 backbone")
    parser.add_argument("--gate-gain", type=float, default=60.0,
                        help="factor on the reuse gate's last layer, so that random weights give reuse "
                             "probabilities spread apart (some reused, some computed)")
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("INPUTS", "OUTPUTS"),
                        help="internal (this script's subprocess): run upstream's tracker on INPUTS, a file "
                             "this script wrote, and save its outputs to OUTPUTS")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.worker:
        _run_upstream(args)
        return
    if not (args.upstream / "model" / "tracker.py").is_file():
        raise FileNotFoundError(f"{args.upstream}/model/tracker.py not found: --upstream must be a checkout "
                                f"of upstream's code")
    sys.path.insert(0, str(ROOT))
    from lib.fileio import atomic_write_bytes
    import io

    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        case = CASES[name]
        vector = make_vector(case, args.upstream.resolve(), args.threads, args.spread_threads,
                             args.checkpoint_seed, args.backbone_seed, args.gate_gain)
        buffer = io.BytesIO()
        torch.save(vector, buffer)
        atomic_write_bytes(args.out / case.name, buffer.getvalue())
        print(f"{case.name}: threshold {vector['threshold']:.4f}, tolerance {vector['tolerance']}; {vector['note']}")


if __name__ == "__main__":
    if "--worker" in sys.argv:  # upstream's side: nothing of ours imported (both have a top-level `lib`)
        main(get_parser().parse_args())
    else:
        sys.path.insert(0, str(ROOT))
        from lib.cli import run
        run(main, get_parser())
