"""Multi-object G-FRTM inference driver (SPEC §5-6), built on the step methods of `GFRTM`.

Per tracked object and frame: template matching and the reuse gate decide between
* computed: target-model score on the high backbone features (run once per frame for all
  computing objects), full decoder, target-model update;
* reused: previous score + Δ, refine-translated decoder state, shallow decoder stages only.
Objects are batched through the network by default; `batch_objects=False` runs them one by one
(same outputs, used by the tests).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import Backbone
from .network import GFRTM
from .target_model import TargetModel, TargetModelConfig

Frame = tuple  # (image uint8 3xHxW, labels uint8 HxW or None, new object ids)


@dataclass
class FrameResult:
    """Output for one frame. Tensors are on the CPU."""

    labels: torch.Tensor  # (H, W) uint8 object ids
    probabilities: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> (H, W) sigmoid(logits)
    reused: dict[int, bool] = field(default_factory=dict)  # id -> reused, objects tracked in this frame
    reuse_prob: dict[int, float] = field(default_factory=dict)  # id -> reuse-gate probability
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> decoder input score (1, 1, h16, w16)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> mask logits (1, 1, H, W)
    seconds: float = 0.0  # tracker time for this frame (no disk reading)


@dataclass
class SequenceResult:
    frames: list[FrameResult]
    seconds: float  # tracker time over the sequence, object initialization included

    @property
    def fps(self) -> float:
        return len(self.frames) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def labels(self) -> list[torch.Tensor]:
        return [f.labels for f in self.frames]


@dataclass
class _Object:
    """State of one tracked object."""

    id: int
    start_frame: int
    start_mask: torch.Tensor  # (H, W) float
    target_model: TargetModel
    template: torch.Tensor | None  # (1, 64, 64)
    prev_score: torch.Tensor  # (1, 1, h16, w16) last computed score (first frame: the mask)
    x16: torch.Tensor  # (1, 64, h16, w16) decoder state after the deep stages


def _max_over_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax (first wins ties) over dim 0 of a short (R, H, W) stack; much faster on
    CPU than a strided reduction when R is small."""
    best, index = x[0].clone(), torch.zeros(x.shape[1:], dtype=torch.long, device=x.device)
    for i in range(1, x.shape[0]):
        better = x[i] > best
        index.masked_fill_(better, i)
        torch.maximum(best, x[i], out=best)
    return best, index


def merge_probabilities(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FRTM's merge. p (1 + N, H, W): row 0 ignored (background), rows 1.. object probabilities.

    Clamp to [1e-7, 1 - 1e-7], background = min over objects of (1 - p), softmax of p / (1 - p)
    over the rows. Returns the kept soft masks (1 + N, H, W) (each row's softmax value where it
    wins, else 0) and the winning row per pixel (H, W).
    """
    p = p.clamp(1e-7, 1 - 1e-7)
    p[0] = 1 - _max_over_rows(p[1:])[0]  # = min over objects of (1 - p), exactly
    odds = p / (1 - p)
    top, _ = _max_over_rows(odds)
    e = torch.exp(odds - top)
    segs = e / e.sum(dim=0)
    _, winner = _max_over_rows(segs)
    rows = torch.arange(segs.shape[0], device=segs.device).view(-1, 1, 1)
    return segs * (winner == rows), winner


def labels_from_merge(soft: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
    """Label rows (H, W) as upstream computes them: it merges the kept soft masks once more,
    which keeps an object's pixel only where its kept value exceeds 0.5 (else background)."""
    kept = soft.gather(0, winner[None])[0]
    return torch.where((winner > 0) & (kept.clamp(max=1 - 1e-7) > 0.5), winner, torch.zeros_like(winner))


class Tracker:
    """G-FRTM (or plain FRTM, when the network has no gate) video object segmenter.

    Takes ownership of `network` and `backbone`: they are moved to `device`, switched to
    channels-last, and the backbone's batch norm is folded into its convolutions (same
    results, faster). Build them with `models.build_tracker` unless you need to share them.
    """

    def __init__(self, network: GFRTM, backbone: Backbone, target_config: TargetModelConfig,
                 augmenter=None, device: torch.device | str = "cpu", batch_objects: bool = True,
                 seed: int = 0, channels_last: bool = True):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.backbone = backbone.to(self.device).eval()
        if channels_last:  # same results, faster convolutions
            self.network.to(memory_format=torch.channels_last)
            self.backbone.use_channels_last()
        self.backbone.fuse_batch_norm()
        self.target_config = target_config
        self.augmenter = augmenter
        self.batch_objects = batch_objects
        self.seed = seed

    # ------------------------------------------------------------------------------------------

    def run_sequence(self, frames: Iterable[Frame], threshold: float = 0.7, keep_probabilities: bool = True,
                     keep_raw: bool = False) -> SequenceResult:
        """Segment a sequence. frames yields (image uint8 3xHxW, labels uint8 HxW or None,
        new object ids); labels are needed on frames where objects start."""
        results = list(self.track(frames, threshold, keep_probabilities, keep_raw))
        return SequenceResult(results, sum(r.seconds for r in results))

    def track(self, frames: Iterable[Frame], threshold: float = 0.7, keep_probabilities: bool = True,
              keep_raw: bool = False) -> Iterator[FrameResult]:
        """Like run_sequence, but yields each frame's result as soon as it is ready."""
        objects: list[_Object] = []
        for t, (image, labels, new_ids) in enumerate(frames):
            start = time.perf_counter()
            with torch.no_grad():
                result = self._frame(objects, t, image, labels, list(new_ids or []), float(threshold), keep_raw)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            result.seconds = time.perf_counter() - start
            if not keep_probabilities:
                result.probabilities = {}
            yield result

    # ------------------------------------------------------------------------------------------

    def _frame(self, objects: list[_Object], t: int, image, labels, new_ids: list[int], threshold: float,
               keep_raw: bool) -> FrameResult:
        image = _as_image(image).to(self.device)
        size = image.shape[-2:]
        known = {o.id for o in objects}
        new_ids = [i for i in new_ids if i not in known]
        if new_ids and labels is None:
            raise ValueError(f"frame {t}: objects {new_ids} start here but no labels were given")
        labels_t = None if labels is None else _as_labels(labels).to(self.device)

        old = list(objects)
        features = None
        new_objects = []
        if new_ids:
            features = self.backbone(image)
            for obj_id in new_ids:
                obj = self._start_object(obj_id, t, image, labels_t, features)
                objects.append(obj)
                new_objects.append(obj)

        result = FrameResult(labels=torch.zeros(size, dtype=torch.uint8))
        if not old:
            if labels_t is not None:
                result.labels = labels_t.to("cpu", torch.uint8)
            return result

        if features is None:
            features = self.backbone.low(image)
        probs, computed = self._track_objects(old, features, size, threshold, result, keep_raw)

        # Objects starting now claim their masks; older objects are suppressed under them.
        rows = [torch.zeros(size, device=self.device)]
        for obj in objects:
            if obj.start_frame == t:
                rows.append(obj.start_mask)
            else:
                p = probs[obj.id]
                for new in new_objects:
                    p = p * (1 - new.start_mask)
                rows.append(p)
        soft, winner = merge_probabilities(torch.stack(rows))
        for obj in computed:
            obj.target_model.update(soft[1 + objects.index(obj)].view(1, 1, *size))
        ids = torch.tensor([0] + [o.id for o in objects], dtype=torch.uint8, device=self.device)
        result.labels = ids[labels_from_merge(soft, winner)].cpu()
        return result

    def _start_object(self, obj_id: int, t: int, image: torch.Tensor, labels: torch.Tensor,
                      features: dict) -> _Object:
        """Initialize an object at its first frame: target model, template, score and state."""
        mask = (labels == obj_id).float()
        if mask.sum() == 0:
            raise ValueError(f"frame {t}: object {obj_id} starts here but its mask is empty")
        h8, w8 = features["layer3"].shape[-2:]
        h16, w16 = features["layer4"].shape[-2:]
        mask4d = mask.view(1, 1, *mask.shape)

        if self.augmenter is not None:
            rng = np.random.default_rng(self.seed)  # each object's augmentation from the same seed
            images, masks = self.augmenter.augment(image[0], mask4d[0], rng)
        else:
            images, masks = image.float(), mask4d
        aug_layer4 = self.backbone(images)["layer4"] if images.shape[0] > 1 else features["layer4"]
        target = TargetModel(features["layer4"].shape[1], self.target_config, self.device, seed=self.seed)
        target.initialize(aug_layer4, masks)

        template = None
        if self.network.has_gate:
            template = self.network.make_template(features["layer3"], F.interpolate(mask4d, (h8, w8), mode="nearest"))
        score = target.apply(features["layer4"])
        x16 = self.network.deep_stages(features, score)
        return _Object(obj_id, t, mask, target, template, F.interpolate(mask4d, (h16, w16), mode="nearest"), x16)

    def _track_objects(self, objs: list[_Object], features: dict, size, threshold: float, result: FrameResult,
                       keep_raw: bool) -> tuple[dict[int, torch.Tensor], list[_Object]]:
        """Gate, score and decode the already started objects. Returns ({id: prob (H, W)}, computed)."""
        net = self.network
        groups = [objs] if self.batch_objects else [[o] for o in objs]
        probs: dict[int, torch.Tensor] = {}
        computed_all: list[_Object] = []
        for group in groups:
            reuse = [False] * len(group)
            matched = None
            if net.has_gate and threshold < 1:  # with threshold >= 1 nothing can be reused
                h8, w8 = features["layer3"].shape[-2:]
                prev = torch.cat([o.prev_score for o in group])
                matched = net.match(features["layer3"], F.interpolate(prev, (h8, w8), mode="bilinear",
                                                                      align_corners=False),
                                    torch.cat([o.template for o in group]))
                p_reuse = torch.softmax(net.gate_logits(matched), dim=1)[:, 0]
                reuse = [bool(p > threshold) for p in p_reuse.tolist()]
                result.reuse_prob.update({o.id: float(p) for o, p in zip(group, p_reuse.tolist())})

            computed = [i for i, r in enumerate(reuse) if not r]
            reused = [i for i, r in enumerate(reuse) if r]
            if computed:
                if "layer4" not in features:  # high backbone once per frame, shared by all objects
                    features.update(self.backbone.high(features["layer3"]))
                scores = torch.cat([group[i].target_model.apply(features["layer4"]) for i in computed])
                logits, x16 = net.decode_computed(features, scores, size)
                for j, i in enumerate(computed):
                    obj = group[i]
                    obj.prev_score, obj.x16 = scores[j:j + 1], x16[j:j + 1]
                    self._record(result, obj, False, logits[j:j + 1], scores[j:j + 1], keep_raw, probs)
                    computed_all.append(obj)
            if reused:
                delta = net.delta(matched[reused])
                prev = torch.cat([group[i].prev_score for i in reused])
                x16_prev = torch.cat([group[i].x16 for i in reused])
                scores = prev + delta
                logits, x16 = net.decode_reused(features, scores, x16_prev, delta, size)
                for j, i in enumerate(reused):
                    group[i].x16 = x16[j:j + 1]
                    self._record(result, group[i], True, logits[j:j + 1], scores[j:j + 1], keep_raw, probs)
        return probs, computed_all

    @staticmethod
    def _record(result: FrameResult, obj: _Object, reused: bool, logits: torch.Tensor, score: torch.Tensor,
                keep_raw: bool, probs: dict) -> None:
        p = torch.sigmoid(logits)[0, 0]
        probs[obj.id] = p
        result.reused[obj.id] = reused
        result.probabilities[obj.id] = p.cpu()
        if keep_raw:
            result.scores[obj.id] = score.cpu()
            result.logits[obj.id] = logits.cpu()


def _as_image(image) -> torch.Tensor:
    """uint8 image as (1, 3, H, W); accepts (3, H, W) tensors or (H, W, 3) numpy arrays."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image array, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    return image


def _as_labels(labels) -> torch.Tensor:
    """Label map as (H, W)."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    while labels.dim() > 2:
        labels = labels[0]
    return labels
