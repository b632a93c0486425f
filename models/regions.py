"""The tracker's per-frame work as named steps on tensors: the regions (docs/architecture.md).

`Tracker` calls every piece of per-frame work through one `Regions` object it holds; it never
calls the backbone, the network or the target models' kernels directly. `Regions` itself runs
them eagerly. Another runtime is another implementation of the same methods, built by
`models.tracker.build_regions`: `models.compiled.CompiledRegions` (torch.compile, `--compile`)
is the second one. Each step takes and returns tensors (or dicts of them); none keeps state
between calls, so a step can be an exported graph.

Per tracked frame (`STEPS`, the names a runtime compiles or exports):

    backbone.low        image (B, 3, H, W) 0..255 -> {layer1, layer2, layer3}
    backbone.high       layer3 -> {layer4, layer5}, once per frame with a computing object
    match               template matching -> M (N, 64, H8, W8)
    gate_logits         M -> reuse-gate logits (N, 2)
    delta               M -> Δ (N, 1, H16, W16)
    decode_computed     features, score -> (mask logits, x16)
    decode_reused       features, score, x16, Δ -> (mask logits, x16)
    target_score        the target models' scores (`models.target_model.target_scores`)
    target_optimizer    their filters' re-optimisation (`models.target_model.optimize_filters`)
    merge_probabilities object probabilities -> kept soft masks, winning rows

Object starts (`start_features`, `make_template`, `deep_stages`, and the target models' joint
initialisation in `TargetModelTable.add`) run eagerly in every runtime here: once per object,
on a batch of 1 + augmentations, they are not worth a compiled graph per shape.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .backbone import Backbone
from .merge import merge_probabilities
from .network import GFRTM
from .target_model import optimize_filters, target_scores

# The per-frame steps in the order a frame runs them; the network's gate steps only with a gate.
STEPS = ("backbone.low", "backbone.high", "match", "gate_logits", "delta", "decode_computed", "decode_reused",
         "target_score", "target_optimizer", "merge_probabilities")
GATE_STEPS = ("match", "gate_logits", "delta", "decode_reused")


class Regions:
    """The per-frame steps of one tracker's network and backbone, run eagerly (the default).

    `steps` maps each step name to the callable that runs it; an implementation for another
    runtime replaces callables (or overrides the methods) and leaves the tracker as it is.
    row_buckets: the tracker pads object batches to powers of two for the network's steps.
    static_shapes: the target models' steps want few shapes (`TargetModelTable`)."""

    row_buckets = False
    static_shapes = False

    def __init__(self, network: GFRTM, backbone: Backbone):
        self.network, self.backbone = network, backbone
        self.steps: dict[str, Callable] = {
            "backbone.low": backbone.low, "backbone.high": backbone.high,
            "match": network.match, "gate_logits": network.gate_logits, "delta": network.delta,
            "decode_computed": network.decode_computed, "decode_reused": network.decode_reused,
            "target_score": target_scores, "target_optimizer": optimize_filters,
            "merge_probabilities": merge_probabilities}

    # -- per tracked frame -----------------------------------------------------------------------

    def backbone_low(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) 0..255 -> {layer1, layer2, layer3}."""
        return self.steps["backbone.low"](image)

    def backbone_high(self, layer3: torch.Tensor) -> dict[str, torch.Tensor]:
        """layer3 (B, C3, H8, W8) -> {layer4, layer5}."""
        return self.steps["backbone.high"](layer3)

    def match(self, layer3: torch.Tensor, score8: torch.Tensor, template: torch.Tensor,
              rows: torch.Tensor | None) -> torch.Tensor:
        """Template matching -> M (N, 64, H8, W8); `rows`: each object's frame row (GFRTM.match)."""
        return self.steps["match"](layer3, score8, template, rows)

    def gate_logits(self, matched: torch.Tensor) -> torch.Tensor:
        """M (N, 64, H8, W8) -> reuse-gate logits (N, 2), index 0 = reuse."""
        return self.steps["gate_logits"](matched)

    def delta(self, matched: torch.Tensor) -> torch.Tensor:
        """M (N, 64, H8, W8) -> Δ (N, 1, H16, W16)."""
        return self.steps["delta"](matched)

    def decode_computed(self, features: Mapping[str, torch.Tensor], score: torch.Tensor, image_size,
                        rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full decoder -> (mask logits (N, 1, H, W), x16 (N, 64, H16, W16))."""
        return self.steps["decode_computed"](features, score, image_size, rows)

    def decode_reused(self, features: Mapping[str, torch.Tensor], score: torch.Tensor, x16_prev: torch.Tensor,
                      delta: torch.Tensor, image_size, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Refine-translated state, shallow stages -> (mask logits (N, 1, H, W), x16 carried on)."""
        return self.steps["decode_reused"](features, score, x16_prev, delta, image_size, rows)

    def target_scores(self, pixels: torch.Tensor, project: torch.Tensor, filter_weight: torch.Tensor,
                      size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The target models' scores (`models.target_model.target_scores`)."""
        return self.steps["target_score"](pixels, project, filter_weight, size)

    def optimize_filters(self, *args) -> tuple[torch.Tensor, ...]:
        """The target models' filter re-optimisation (`models.target_model.optimize_filters`,
        same arguments) -> (filters, direction, rho, residual)."""
        return self.steps["target_optimizer"](*args)

    def merge_probabilities(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, 1 + N, H, W) probabilities -> (kept soft masks, winning row) (`models.merge`)."""
        return self.steps["merge_probabilities"](p)

    # -- object starts: eager in every runtime here (see the module docstring) -------------------

    def start_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """All five backbone levels of a start's batch (the frame, then augmented images)."""
        return self.backbone(images)

    def make_template(self, layer3: torch.Tensor, mask8: torch.Tensor) -> torch.Tensor:
        """(B, C3, H8, W8), (B, 1, H8, W8) -> the object's template (B, 64, 64)."""
        return self.network.make_template(layer3, mask8)

    def deep_stages(self, features: Mapping[str, torch.Tensor], score: torch.Tensor) -> torch.Tensor:
        """The decoder's deep stages on a start's features -> x16 (B, 64, H16, W16)."""
        return self.network.deep_stages(features, score)

    def report(self, sizes) -> None:
        """Called after each tracking step with its frame sizes; a runtime that builds graphs
        per shape says here what it built. Eager: nothing to say."""
