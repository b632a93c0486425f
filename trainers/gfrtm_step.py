"""One G-FRTM training step (SPEC §8), built from the step methods of `models.GFRTM`.

`GFRTMStep.loss(images, labels, target_models, epoch)` returns `(loss, stats, visuals)`; only
the trainer calls backward, steps, clips and logs. Shapes: B samples, T frames per sample,
(H, W) the training image size, (h8, w8) / (h16, w16) the stride-8 / stride-16 sizes.
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


@dataclass
class GateLossConfig:
    """Reuse-gate loss settings. m1 / margin_epochs give upstream's margin m1 * min(1, epoch /
    margin_epochs), meant as a floor on the IoU target; upstream discarded it (its clamp result
    was unused), so by default it is only logged. apply_margin=True applies it."""

    m1: float = 1.0
    m2: float = 0.0
    margin_epochs: int = 120
    apply_margin: bool = False

    def margin(self, epoch: int) -> float:
        return self.m1 * min(1.0, epoch / self.margin_epochs) if self.margin_epochs > 0 else self.m1


def straight_through_gate(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate (B, 1): 1 = reuse, forward value the hard argmax, gradient of the softmax's reuse
    entry; probabilities (B, 2)). No Gumbel noise, as upstream."""
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


def _resize(t: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(t, size, mode="bilinear", align_corners=False)


class GFRTMStep(nn.Module):
    """The learnable network with the frozen backbone, for training."""

    def __init__(self, network: GFRTM, backbone: Backbone, gate_loss: GateLossConfig):
        super().__init__()
        self.network = network
        self.backbone = backbone
        self.gate_loss = gate_loss

    def forward(self, images, labels, target_models, epoch):
        """Same as loss() (DistributedDataParallel calls forward)."""
        return self.loss(images, labels, target_models, epoch)

    def loss(self, images: list[torch.Tensor], labels: list[torch.Tensor], target_models: list[TargetModel],
             epoch: int) -> tuple[torch.Tensor, dict, dict]:
        """images: T tensors (B, 3, H, W) 0..255; labels: T tensors (B, 1, H, W) 0/1; frame 0 is
        each sample's reference frame. target_models: B trained target models (frozen).
        Returns the sum over frames 1.. of (segmentation + delta + gate) losses, per-frame
        averages of each in `stats`, and tensors of frame 1 for logging in `visuals`.
        (Upstream called backward once per frame; one backward of the sum gives the same gradients.)"""
        total, sums, visuals, n = 0.0, {}, {}, 0
        for loss, stats, frame_visuals in self.frame_losses(images, labels, target_models, epoch):
            total = total + loss
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            visuals = visuals or frame_visuals
            n += 1
        stats = {k: v / n for k, v in sums.items()}
        stats["loss"] = stats["loss_seg"] + stats["loss_diff"] + stats["loss_gp"]
        stats["margin"] = self.gate_loss.margin(epoch)
        return total, stats, visuals

    def frame_losses(self, images: list[torch.Tensor], labels: list[torch.Tensor],
                     target_models: list[TargetModel], epoch: int):
        """Yields per frame t >= 1: (loss_t, stats_t, visuals_t); see loss()."""
        net = self.network
        size = images[0].shape[-2:]
        with torch.no_grad():
            first = self.backbone(images[0])
        first_mask = labels[0].float()
        h8, w8 = first["layer3"].shape[-2:]
        h16, w16 = math.ceil(h8 / 2), math.ceil(w8 / 2)

        template = net.make_template(first["layer3"], _resize(first_mask, (h8, w8)))
        prev_score = _resize(first_mask, (h16, w16))
        scores = self._target_scores(target_models, first["layer4"])
        x16 = net.deep_stages(first, scores)
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

            # Computed samples: this frame's layer4/5 and target-model score; reused samples: the
            # previous frame's layer4/5 and score for the deep stages, previous score + Δ for the
            # shallow ones.
            reuse = gate.detach()[:, 0] > 0.5
            computed_scores = self._target_scores(target_models, features["layer4"])
            sel = reuse.view(-1, 1, 1, 1)
            deep_score = torch.where(sel, prev_score, computed_scores)
            score = torch.where(sel, prev_score + delta, computed_scores)
            mixed = dict(features)
            for level in ("layer4", "layer5"):
                mixed[level] = torch.where(sel, prev_features[level], features[level])
            logits, x16 = net.decode_training(mixed, score, deep_score, gate, x16, delta, size)
            prob = torch.sigmoid(logits)

            with torch.no_grad():
                same = mask_iou(mask, ref_mask, empty=0.0)[:, 0]
                if self.gate_loss.apply_margin:
                    same = same.clamp(min=margin)
                target = torch.stack([same, 1 - same], dim=1)
            loss_gate = F.mse_loss(F.relu((probs - target).abs() - self.gate_loss.m2), torch.zeros_like(target))
            loss_seg = F.binary_cross_entropy(prob, mask)
            loss_diff = F.mse_loss(delta, _resize(mask, (h16, w16)) - prev_score)
            stats = {"loss_seg": loss_seg.item(), "loss_diff": loss_diff.item(), "loss_gp": loss_gate.item(),
                     "accuracy": mask_iou(prob.detach(), mask).mean().item(), "reuse_rate": reuse.float().mean().item()}
            visuals = {"frame": images[t][:1], "mask": mask[:1], "prediction": prob.detach()[:1],
                       "delta": delta.detach()[:1]}
            yield loss_seg + loss_diff + loss_gate, stats, visuals

            prev_score = deep_score.detach()
            prev_features = mixed
            g = gate.detach().view(-1, 1, 1, 1)
            ref_mask = g * ref_mask + (1 - g) * mask

    @staticmethod
    def _target_scores(target_models: list[TargetModel], layer4: torch.Tensor) -> torch.Tensor:
        """Each sample's frozen target model on its own features -> (B, 1, h16, w16)."""
        with torch.no_grad():
            return torch.cat([tm.apply(layer4[i:i + 1]) for i, tm in enumerate(target_models)])
