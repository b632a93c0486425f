"""The tracker's per-frame and object-start work as separate graphs, for export (ONNX, `export.py`).

Each graph is a small module over the steps of a `models.regions.Regions` (the steps the tracker
runs a frame through) and the target-model functions of `TargetModelTable` (first-frame fit,
memory encoding): the tensor glue between steps sits inside the graphs, the
decisions (reuse gate threshold, which objects compute, memory slots, object starts) stay in the
host loop (`deploy/`). Every graph takes a batch of N objects of one frame (frame features with
batch 1); frame size, object count and memory length are dynamic axes.

`GRAPHS` lists, per graph, its input and output names and the dynamic axes of each input; the
manifest written by `export.py` repeats them for the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .merge import labels_from_merge
from .regions import Regions
from .target_model import TargetModelConfig, UpsamplingMetric, _initial_theta, initial_fit, pixel_weights


def resize_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """F.interpolate(x, size, mode="nearest") of (B, C, H, W) as two index gathers: source index
    floor(dst · (in / out)) in float32, as torch computes it; an exported Resize computes its
    source coordinates otherwise and picks other pixels at some sizes."""
    def index(n_in, n_out) -> torch.Tensor:
        scale = torch.full((), n_in, dtype=torch.float32, device=x.device) / n_out
        source = (torch.arange(n_out, device=x.device).float() * scale).floor().long()
        return source.clamp(max=n_in - 1)

    return x.index_select(-2, index(x.shape[-2], size[0])).index_select(-1, index(x.shape[-1], size[1]))


class _Steps(nn.Module):
    """A graph over a `Regions`' steps. Of the regions' network and backbone, those a graph's
    steps use (`WEIGHTS`) are its submodules: the exporter takes their weights as the graph's
    parameters, and no graph carries weights it does not use."""

    WEIGHTS: tuple[str, ...] = ()

    def __init__(self, regions: Regions):
        super().__init__()
        self.regions = regions
        for name in self.WEIGHTS:
            setattr(self, name, getattr(regions, name))


class BackboneLow(_Steps):
    """image uint8 (B, 3, H, W) -> layer2 (B, C2, H4, W4), layer3 (B, C3, H8, W8)."""

    WEIGHTS = ("backbone",)

    def forward(self, image: torch.Tensor):
        features = self.regions.backbone_low(image)
        return features["layer2"], features["layer3"]


class BackboneHigh(_Steps):
    """layer3 (B, C3, H8, W8) -> layer4 (B, C4, H16, W16), layer5 (B, C5, H32, W32)."""

    WEIGHTS = ("backbone",)

    def forward(self, layer3: torch.Tensor):
        features = self.regions.backbone_high(layer3)
        return features["layer4"], features["layer5"]


class TargetScores(_Steps):
    """N target models on one frame: layer4 (1, C4, h, w), projections (N, c, C4), filters
    (N, c, 9) -> projected pixels z (N, h w, c) (the sample a memory insert stores) and scores
    (N, 1, h, w)."""

    def forward(self, layer4: torch.Tensor, project: torch.Tensor, filters: torch.Tensor):
        _, c_in, h, w = layer4.shape
        pixels = layer4.float().permute(0, 2, 3, 1).reshape(1, h * w, c_in).expand(project.shape[0], -1, -1)
        return self.regions.target_scores(pixels, project, filters, (h, w))


class Gate(_Steps):
    """Template matching and reuse gate: layer3 (1, C3, H8, W8), previous scores (N, 1, h16,
    w16), templates (N, 64, 64) -> matched M (N, 64, H8, W8), reuse probability (N,)."""

    WEIGHTS = ("network",)

    def forward(self, layer3: torch.Tensor, prev_score: torch.Tensor, template: torch.Tensor):
        prev = F.interpolate(prev_score, layer3.shape[-2:], mode="bilinear", align_corners=False)
        matched = self.regions.match(layer3, prev, template, None)
        return matched, torch.softmax(self.regions.gate_logits(matched).float(), dim=1)[:, 0]


class DecodeComputed(_Steps):
    """Gate 0: image (1, 3, H, W) (its size only), layer2..layer5 (batch 1), target-model scores
    (N, 1, h16, w16) -> logits (N, 1, H, W), probabilities (N, H, W), decoder state x16."""

    WEIGHTS = ("network",)

    def forward(self, image, layer2, layer3, layer4, layer5, scores):
        features = {"layer2": layer2, "layer3": layer3, "layer4": layer4, "layer5": layer5}
        logits, x16 = self.regions.decode_computed(features, scores, image.shape[-2:], None)
        return logits, torch.sigmoid(logits.float())[:, 0], x16


class DecodeReused(_Steps):
    """Gate 1: image (its size), layer2, layer3 (batch 1), matched M (N, 64, H8, W8), previous
    scores (N, 1, h16, w16) and decoder states x16 (N, 64, h16, w16) -> logits, probabilities,
    decoder input scores (previous + Δ). The carried x16 stays as it was."""

    WEIGHTS = ("network",)

    def forward(self, image, layer2, layer3, matched, prev_score, x16_prev):
        delta = self.regions.delta(matched)
        scores = prev_score + delta.float()
        logits, _ = self.regions.decode_reused({"layer2": layer2, "layer3": layer3}, scores, x16_prev, delta,
                                               image.shape[-2:], None)
        return logits, torch.sigmoid(logits.float())[:, 0], scores


class ObjectStart(_Steps):
    """The network's part of O object starts on one frame: layer2..layer5 (batch 1), masks
    (O, 1, H, W) float 0/1, target-model scores (O, 1, h16, w16) -> template (O, 64, 64) (G-FRTM
    only), decoder state x16 (O, 64, h16, w16), previous score (the mask at stride 16)."""

    WEIGHTS = ("network",)

    def forward(self, layer2, layer3, layer4, layer5, masks, scores):
        features = {"layer2": layer2, "layer3": layer3, "layer4": layer4, "layer5": layer5}
        o = masks.shape[0]
        x16 = self.regions.deep_stages(features, scores)
        prev_score = resize_nearest(masks, layer4.shape[-2:])
        if not self.regions.network.has_gate:
            return x16, prev_score
        template = self.regions.make_template(layer3.expand(o, -1, -1, -1),
                                              resize_nearest(masks, layer3.shape[-2:]))
        return template, x16, prev_score


class TargetInit(_Steps):
    """First-frame fit and first filter optimisation of O target models (`TargetModelTable.add`):
    layer4 of each object's K samples (O, K, C4, h, w), masks (O K, 1, H, W), sample weights
    (K,) -> θ rows (O, D), the memory's first samples (O, K, ...) and the filter optimizer's
    state (direction (O, 9 c), ρ (O, 1), residual (O, 9 c))."""

    def __init__(self, regions: Regions, config: TargetModelConfig, in_channels: int, seed: int,
                 forget_factor: float):
        super().__init__(regions)
        self.config, self.forget_factor = config, forget_factor
        self.register_buffer("initial", _initial_theta(in_channels, config.channels, seed, torch.device("cpu")))
        self.in_channels = in_channels

    def forward(self, features: torch.Tensor, masks: torch.Tensor, sample_weights: torch.Tensor):
        cfg = self.config
        o, k, _, h, w = features.shape
        upsampling = UpsamplingMetric((h, w), tuple(masks.shape[-2:]), features.device)
        weights = sample_weights.repeat(o)
        theta, samples, metrics, targets = initial_fit(features.float(), masks.float(), weights.view(-1, 1, 1, 1),
                                                       self.initial.expand(o, -1), cfg, upsampling,
                                                       self.forget_factor, row_exact=True)
        split = cfg.channels * self.in_channels
        filters, direction, rho, residual = self.regions.optimize_filters(
            samples, metrics, targets, weights.view(o, k), theta[:, split:], None, tuple(cfg.update_iters),
            cfg.filter_reg[1], cfg.precond[1], self.forget_factor)
        return torch.cat([theta[:, :split], filters], dim=1), samples, metrics, targets, direction, rho, residual


class MemoryEncode(nn.Module):
    """What a memory insert stores besides the projected sample: soft masks (N, 1, H, W) and the
    scores' shape (N, 1, h, w) -> metrics (N, 9, h, w), targets (N, 1, h, w), and whether each
    mask has the foreground an update needs (N,) bool."""

    def __init__(self, config: TargetModelConfig):
        super().__init__()
        self.config = config

    def forward(self, soft_masks: torch.Tensor, scores: torch.Tensor):
        cfg = self.config
        upsampling = UpsamplingMetric(tuple(scores.shape[-2:]), tuple(soft_masks.shape[-2:]), soft_masks.device)
        masks = soft_masks.float()
        pw = pixel_weights((masks > 0.5).float(), cfg.pixel_weighting, cfg.target_fraction)
        metrics, targets = upsampling.encode(masks, pw)
        return metrics, targets, cfg.enough_foreground(masks)


class OptimizeFilters(_Steps):
    """Filter re-optimisation (`optimize_filters`, the config's update iterations) of N target
    models over their memories of S slots: samples (N, S, h w, c), metrics (N, S, 9, h, w),
    targets (N, S, 1, h, w), sample weights (N, S), filters (N, 9 c), state (direction, ρ,
    residual) -> new filters and state."""

    def __init__(self, regions: Regions, config: TargetModelConfig, forget_factor: float):
        super().__init__(regions)
        self.config, self.forget_factor = config, forget_factor

    def forward(self, samples, metrics, targets, weights, filters, direction, rho, residual):
        cfg = self.config
        return self.regions.optimize_filters(samples, metrics, targets, weights, filters, (direction, rho, residual),
                                tuple(cfg.update_iters), cfg.filter_reg[1], cfg.precond[1], self.forget_factor)


class Merge(_Steps):
    """FRTM's merge: probabilities (1 + N, H, W), row 0 ignored -> kept soft masks (1 + N, H, W)
    and each pixel's label row (H, W) int64 (0 = background; row i = the i-th object)."""

    def forward(self, p: torch.Tensor):
        soft, winner = self.regions.merge_probabilities(p.clone())
        return soft, labels_from_merge(soft, winner)


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: input names with their dynamic axes ({axis: name}), output names, and
    whether `export.py --int8` quantises it (the convolution-heavy ones)."""

    inputs: dict[str, dict[int, str]]
    outputs: tuple[str, ...]
    quantised: bool = False


_IMAGE = {0: "batch", 2: "height", 3: "width"}
_L2, _L3 = {2: "h4", 3: "w4"}, {2: "h8", 3: "w8"}
_L4, _L5 = {2: "h16", 3: "w16"}, {2: "h32", 3: "w32"}
_OBJ16 = {0: "objects", 2: "h16", 3: "w16"}

GRAPHS: dict[str, GraphSpec] = {
    "backbone_low": GraphSpec({"image": _IMAGE}, ("layer2", "layer3"), quantised=True),
    "backbone_high": GraphSpec({"layer3": {0: "batch", **_L3}}, ("layer4", "layer5"), quantised=True),
    "target_scores": GraphSpec({"layer4": _L4, "project": {0: "objects"}, "filters": {0: "objects"}},
                               ("z", "scores")),
    "gate": GraphSpec({"layer3": _L3, "prev_score": _OBJ16, "template": {0: "objects"}},
                      ("matched", "reuse_prob"), quantised=True),
    "decode_computed": GraphSpec({"image": {2: "height", 3: "width"}, "layer2": _L2, "layer3": _L3, "layer4": _L4,
                                  "layer5": _L5, "scores": _OBJ16}, ("logits", "probability", "x16"),
                                 quantised=True),
    "decode_reused": GraphSpec({"image": {2: "height", 3: "width"}, "layer2": _L2, "layer3": _L3,
                                "matched": {0: "objects", **_L3}, "prev_score": _OBJ16, "x16_prev": _OBJ16},
                               ("logits", "probability", "scores"), quantised=True),
    "object_start": GraphSpec({"layer2": _L2, "layer3": _L3, "layer4": _L4, "layer5": _L5,
                               "masks": {0: "objects", 2: "height", 3: "width"}, "scores": _OBJ16},
                              ("template", "x16", "prev_score")),
    "target_init": GraphSpec({"features": {0: "objects", 1: "samples", 3: "h16", 4: "w16"},
                              "masks": {0: "object_samples", 2: "height", 3: "width"},
                              "sample_weights": {0: "samples"}},
                             ("theta", "samples", "metrics", "targets", "direction", "rho", "residual")),
    "memory_encode": GraphSpec({"soft_masks": {0: "objects", 2: "height", 3: "width"}, "scores": _OBJ16},
                               ("metrics", "targets", "enough")),
    "optimize_filters": GraphSpec({"samples": {0: "objects", 1: "slots", 2: "hw"},
                                   "metrics": {0: "objects", 1: "slots", 3: "h16", 4: "w16"},
                                   "targets": {0: "objects", 1: "slots", 3: "h16", 4: "w16"},
                                   "weights": {0: "objects", 1: "slots"}, "filters": {0: "objects"},
                                   "direction": {0: "objects"}, "rho": {0: "objects"}, "residual": {0: "objects"}},
                                  ("new_filters", "new_direction", "new_rho", "new_residual")),
    "merge": GraphSpec({"p": {0: "rows", 1: "height", 2: "width"}}, ("soft", "labels")),
}


def graph_modules(regions: Regions, config: TargetModelConfig, seed: int,
                  forget_factor: float) -> dict[str, nn.Module]:
    """The graphs' modules over the eager regions of a network and a backbone (eval mode, the
    backbone's batch norm folded)."""
    in_channels = regions.backbone.channels["layer4"]
    modules = {
        "backbone_low": BackboneLow(regions), "backbone_high": BackboneHigh(regions),
        "target_scores": TargetScores(regions), "decode_computed": DecodeComputed(regions),
        "object_start": ObjectStart(regions), "target_init": TargetInit(regions, config, in_channels, seed, forget_factor),
        "memory_encode": MemoryEncode(config), "optimize_filters": OptimizeFilters(regions, config, forget_factor),
        "merge": Merge(regions),
    }
    if regions.network.has_gate:
        modules["gate"] = Gate(regions)
        modules["decode_reused"] = DecodeReused(regions)
    return {name: m.eval() for name, m in modules.items()}
