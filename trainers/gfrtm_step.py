"""One G-FRTM training step (Park et al., CVPR 2021; docs/training.md), built from the step methods of `models.GFRTM`.

`GFRTMStep.loss(images, labels, target_models, epoch)` returns `(loss, stats)`; only the trainer
calls backward, steps, clips and logs. Shapes: B samples, T frames per sample, (H, W) the
training image size, (h8, w8) / (h16, w16) the stride-8 / stride-16 sizes.

Per later frame t (upstream `model/training_model.py`, in its order):
1. template matching of frame t against the reference template, with the previous score S_{t-1}
   resized to stride 8 -> M_t; gate logits and Δ_t from M_t;
2. straight-through gate: forward the hard one-hot of the argmax, backward the softmax's gradient;
3. computed samples (gate 0) take this frame's layer4/5 and the target-model score s_t; reused
   samples (gate 1) the previous frame's (mixed) layer4/5 and S_{t-1} for the deep stages, and
   S_{t-1} + Δ_t for the shallow stages; `GFRTM.decode_training` mixes both decoder paths;
4. losses: BCE of the mask, MSE(Δ_t, mask_t at stride 16 - S_{t-1}), gate MSE against
   (IoU(mask_t, mask_ref), 1 - IoU) with mask_ref the mask of the last computed frame;
5. S_t = the deep-stage score of step 3; mask_ref moves to mask_t where the gate computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Backbone
from models.network import GFRTM
from models.target_model import TargetModel

STAT_KEYS = ("loss_seg", "loss_diff", "loss_gp", "accuracy", "reuse_rate")


@dataclass
class GateLossConfig:
    """Reuse-gate loss settings. m1 / margin_epochs give upstream's margin m1 * min(1, epoch /
    margin_epochs), meant as a floor on the IoU target; upstream discarded it (its clamp result
    was unused), so by default it is only logged. apply_margin=True applies it. Gate-loss errors
    below m2 are ignored."""

    m1: float = 1.0
    m2: float = 0.0
    margin_epochs: int = 120
    apply_margin: bool = False

    def margin(self, epoch: int) -> float:
        return self.m1 * min(1.0, epoch / self.margin_epochs) if self.margin_epochs > 0 else self.m1


def straight_through_gate(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate (B, 1): 1 = reuse, forward value the hard argmax, gradient that of the softmax's
    reuse entry; probabilities (B, 2)). No Gumbel noise, as upstream. The forward values are
    exactly 0 or 1 ((1 - p) + p == 1 in floating point for p >= 0.5)."""
    probs = torch.softmax(logits, dim=1)
    hard = F.one_hot(probs.argmax(dim=1), 2).to(probs.dtype)
    gate = (hard - probs.detach() + probs)[:, :1]
    return gate, probs


def mask_iou(a: torch.Tensor, b: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """IoU of (B, 1, H, W) masks at 0.5 per sample (B, 1); `empty` when both are empty
    (upstream: 1 for the accuracy, 0 for the gate target)."""
    a, b = (a > 0.5).float(), (b > 0.5).float()
    inter = (a * b).sum(dim=(-2, -1))
    union = ((a + b) > 0.5).float().sum(dim=(-2, -1))
    return torch.nan_to_num(inter / union, nan=empty, posinf=0.0)


def segmentation_loss(logits: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the mask. In fp32 upstream's: on the probabilities (its clamped log gives no
    gradient where the sigmoid saturates to exactly 0 or 1). Under autocast (--precision bf16 /
    fp16) with logits, because F.binary_cross_entropy is refused under CUDA autocast."""
    if torch.is_autocast_enabled(logits.device.type):
        return F.binary_cross_entropy_with_logits(logits, mask)
    return F.binary_cross_entropy(prob, mask)


def gate_target(same: torch.Tensor, margin: float, apply_margin: bool) -> torch.Tensor:
    """(B,) IoU of the current and reference masks -> gate target (B, 2): (reuse, compute).
    With apply_margin the reuse target is at least `margin` (upstream computed this floor but
    discarded it)."""
    if apply_margin:
        same = same.clamp(min=margin)
    return torch.stack([same, 1 - same], dim=1)


def _resize(t: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(t, size, mode="bilinear", align_corners=False)


class GFRTMStep(nn.Module):
    """The learnable network with the frozen backbone, for training.

    After each loss() call `visuals` holds detached tensors of sample 0 for logging: "frame"
    (T-1, 3, H, W) 0..255, "mask", "prediction" (T-1, 1, H, W) and "delta" (T-1, 1, h16, w16).
    """

    def __init__(self, network: GFRTM, backbone: Backbone, gate_loss: GateLossConfig):
        super().__init__()
        self.network = network
        self.backbone = backbone
        self.gate_loss = gate_loss
        self.visuals: dict[str, torch.Tensor] = {}

    def forward(self, images, labels, target_models, epoch):
        """Same as loss() (DistributedDataParallel calls forward)."""
        return self.loss(images, labels, target_models, epoch)

    def loss(self, images: list[torch.Tensor], labels: list[torch.Tensor], target_models: list[TargetModel],
             epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """images: T tensors (B, 3, H, W) 0..255; labels: T tensors (B, 1, H, W) 0/1; frame 0 is
        each sample's reference frame. target_models: B trained (frozen) target models.

        Returns the SUM over frames 1.. of (segmentation + delta + gate) losses, and stats:
        per-frame averages of loss_seg, loss_diff, loss_gp, accuracy (IoU at 0.5) and
        reuse_rate, their loss sum `loss`, and `margin`. Upstream called backward once per
        frame; one backward of the sum gives the same gradients.
        """
        total, per_frame, visuals = 0.0, [], []
        for loss, stats, frame_visuals in self.frame_losses(images, labels, target_models, epoch):
            total = total + loss
            per_frame.append(torch.stack([stats[k] for k in STAT_KEYS]))
            visuals.append(frame_visuals)
        means = torch.stack(per_frame).mean(dim=0).tolist()  # one device sync per step
        stats = dict(zip(STAT_KEYS, means))
        stats["loss"] = stats["loss_seg"] + stats["loss_diff"] + stats["loss_gp"]
        stats["margin"] = self.gate_loss.margin(epoch)
        self.visuals = {k: torch.cat([v[k] for v in visuals]) for k in visuals[0]}
        return total, stats

    def frame_losses(self, images: list[torch.Tensor], labels: list[torch.Tensor],
                     target_models: list[TargetModel], epoch: int):
        """Yields per frame t >= 1: (loss_t, stats_t (0-dim tensors, keys STAT_KEYS), visuals_t);
        see loss(). The losses of later frames depend on the graph of earlier ones."""
        if len(images) < 2 or len(images) != len(labels):
            raise ValueError(f"need at least 2 frames with labels, got {len(images)} images, {len(labels)} labels")
        net = self.network
        size = images[0].shape[-2:]
        with torch.no_grad():
            first = self.backbone(images[0])
        first_mask = labels[0].float()
        h8, w8 = first["layer3"].shape[-2:]
        h16, w16 = math.ceil(h8 / 2), math.ceil(w8 / 2)

        # Upstream's training template takes the mask BILINEARLY resized to stride 8, and the
        # first previous score is the mask bilinearly resized to ceil(h8 / 2) x ceil(w8 / 2).
        template = net.make_template(first["layer3"], _resize(first_mask, (h8, w8)))
        prev_score = _resize(first_mask, (h16, w16))
        x16 = net.deep_stages(first, self._target_scores(target_models, first["layer4"]))
        prev_features = first
        ref_mask = first_mask  # mask of the last frame whose gate computed

        margin = self.gate_loss.margin(epoch)
        for t in range(1, len(images)):
            mask = labels[t].float()
            with torch.no_grad():
                features = self.backbone(images[t])
            matched = net.match(features["layer3"], _resize(prev_score, (h8, w8)), template)
            gate, probs = straight_through_gate(net.gate_logits(matched))
            delta = net.delta(matched)

            reuse = gate.detach()[:, 0] > 0.5
            sel = reuse.view(-1, 1, 1, 1)
            computed_scores = self._target_scores(target_models, features["layer4"])
            deep_score = torch.where(sel, prev_score, computed_scores)
            score = torch.where(sel, prev_score + delta, computed_scores)
            mixed = dict(features)
            for level in ("layer4", "layer5"):
                mixed[level] = torch.where(sel, prev_features[level], features[level])
            logits, x16 = net.decode_training(mixed, score, deep_score, gate, x16, delta, size)
            logits = logits.float()  # the loss and the statistics in fp32 under autocast too
            prob = torch.sigmoid(logits)

            with torch.no_grad():
                target = gate_target(mask_iou(mask, ref_mask, empty=0.0)[:, 0], margin, self.gate_loss.apply_margin)
            loss_gate = F.mse_loss(F.relu((probs - target).abs() - self.gate_loss.m2), torch.zeros_like(target))
            loss_seg = segmentation_loss(logits, prob, mask)
            loss_diff = F.mse_loss(delta, _resize(mask, (h16, w16)) - prev_score)
            stats = {"loss_seg": loss_seg.detach(), "loss_diff": loss_diff.detach(), "loss_gp": loss_gate.detach(),
                     "accuracy": mask_iou(prob.detach(), mask).mean(), "reuse_rate": reuse.float().mean()}
            visuals = {"frame": images[t][:1].detach(), "mask": mask[:1], "prediction": prob.detach()[:1],
                       "delta": delta.detach()[:1]}
            yield loss_seg + loss_diff + loss_gate, stats, visuals

            prev_score = deep_score.detach()
            prev_features = mixed
            g = gate.detach().view(-1, 1, 1, 1)
            ref_mask = g * ref_mask + (1 - g) * mask

    @staticmethod
    def _target_scores(target_models: list[TargetModel], layer4: torch.Tensor) -> torch.Tensor:
        """Each sample's frozen target model on its own features -> (B, 1, h16, w16)."""
        return TargetModel.apply_many(target_models, layer4)
