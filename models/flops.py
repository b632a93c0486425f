"""FLOPs of G-FRTM's paths, counted by torch.utils.flop_counter, and of frames from their decisions.

A tracked frame costs the low backbone (conv1 .. layer2) once, the high backbone (layer3,
layer4) once if any object computes or starts in it, and per object:
* gate: template matching and the reuse gate (where the gate runs: TH < 1 and a gate network);
* computed: target-model score and the full decoder;
* reused: Δ and the refine-translated shallow decoder.
Counts are those of torch.utils.flop_counter (convolutions and matrix products; a multiply-add
is 2 FLOPs; element-wise operations, resizing and softmax are not counted). Object
initialization (first-frame augmentation, target-model training) and the target models'
updates are not counted: they do not depend on the threshold's decisions.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lib.precision import autocast
from .target_model import TargetModel

PATHS = ("backbone_low", "backbone_high", "gate", "computed", "reused")


@contextmanager
def _counted(flops: dict[str, int], name: str) -> Iterator[None]:
    """Count the FLOPs of the code in the block into flops[name]."""
    counter = FlopCounterMode(display=False)
    with counter:
        yield
    flops[name] = int(counter.get_total_flops())


def path_flops(tracker, size: tuple[int, int]) -> dict[str, int]:
    """FLOPs of each path of `tracker` (a models.Tracker) on frames of `size` (H, W), for one
    object: {"backbone_low", "backbone_high", "gate", "computed", "reused"} (gate and reused are
    0 for a network without a gate)."""
    net, backbone, device = tracker.network, tracker.backbone, tracker.device
    flops: dict[str, int] = {}
    image = torch.zeros(1, 3, *size, dtype=torch.uint8, device=device)
    with torch.no_grad(), autocast(device, tracker.dtype):
        with _counted(flops, "backbone_low"):
            features = backbone.low(image)
        with _counted(flops, "backbone_high"):
            features.update(backbone.high(features["layer3"]))
        target = TargetModel(features["layer4"].shape[1], tracker.target_config, device)
        with _counted(flops, "computed"):
            score = target.apply(features["layer4"])
            _, x16 = net.decode_computed(features, score, size)
        flops["gate"] = flops["reused"] = 0
        if net.has_gate:
            layer3 = features["layer3"]
            h8, w8 = layer3.shape[-2:]
            template = net.make_template(layer3, torch.ones(1, 1, h8, w8, device=device))
            with _counted(flops, "gate"):
                prev = F.interpolate(score, (h8, w8), mode="bilinear", align_corners=False)
                matched = net.match(layer3, prev, template)
                net.gate_logits(matched)
            with _counted(flops, "reused"):
                delta = net.delta(matched)
                net.decode_reused(features, score + delta.float(), x16, delta, size)
    return {name: flops[name] for name in PATHS}


def frame_flops(paths: Mapping[str, int], reused: Mapping, gated: int, starts: bool) -> int:
    """FLOPs of one frame: `reused` {object id: reused?} of the objects tracked in it, `gated`
    how many of them the gate ran for, `starts` whether an object starts in it."""
    n_reused = sum(bool(r) for r in reused.values())
    n_computed = len(reused) - n_reused
    high = paths["backbone_high"] if n_computed or starts else 0
    return (paths["backbone_low"] + high + gated * paths["gate"] + n_computed * paths["computed"]
            + n_reused * paths["reused"])


def timeline_flops(paths: Mapping[str, int], timeline: Iterable[Mapping], start_frames: set[str]) -> int:
    """FLOPs of a sequence from its timeline (timeline.json's "frames": {"frame", "reused",
    "reuse_prob"} per frame) and the names of the frames where objects start."""
    return sum(frame_flops(paths, f["reused"], len(f.get("reuse_prob", {})), str(f["frame"]) in start_frames)
               for f in timeline)
