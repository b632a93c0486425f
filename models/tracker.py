"""Multi-object G-FRTM inference driver (Park et al., CVPR 2021), built on the step methods of `GFRTM`.

Per tracked object and frame: template matching and the reuse gate decide between
* computed: target-model score on the high backbone features (run once per frame for all
  computing objects), full decoder, target-model update;
* reused: previous score + Δ, refine-translated decoder state, shallow decoder stages only.
Objects are batched through the network by default; `batch_objects=False` runs them one by one
(same outputs, used by the tests).

The frame loop does not wait on the device more than it must: all gate decisions of a frame are
fetched in one transfer, the labels (with the target models' update checks, and probabilities
or raw outputs only when asked for) in another, and the next frame is already copied to the
device (pinned memory, non_blocking) while the current one is tracked. `precision` "bf16" /
"fp16" runs the backbone and the network under autocast; the target models and the merge of
object probabilities stay in fp32.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lib.errors import UsageError

from .backbone import Backbone
from .network import GFRTM
from .precision import autocast, check_precision, to_device
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
    seconds: float = 0.0  # tracker time for this frame (no disk reading; on CUDA, device work still
    # queued when the labels are out, the target models' updates, counts in the next frame)


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


@dataclass
class _Output:
    """One tracked object's output on one frame, on the device."""

    obj: _Object
    reused: bool
    probability: torch.Tensor  # (H, W) fp32 sigmoid(logits)
    score: torch.Tensor  # (1, 1, h16, w16) decoder input score
    logits: torch.Tensor  # (1, 1, H, W)
    reuse_prob: float | None  # None where the gate did not run


@dataclass
class _Sequence:
    """Tracking state of one sequence."""

    objects: list[_Object] = field(default_factory=list)
    ids: torch.Tensor | None = None  # (1 + N,) uint8 on the device: merge row -> object id

    def starting(self, new_ids: list[int]) -> list[int]:
        """The ids of `new_ids` not yet tracked."""
        known = {o.id for o in self.objects}
        return [i for i in new_ids if i not in known]


@dataclass
class _Slot:
    """One of `track_many`'s sequences in flight."""

    key: Hashable
    frames: Iterator[tuple]  # `Tracker._on_device` of its frames
    sequence: _Sequence
    t: int = 0


def fetch(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy device tensors to the host in one transfer (one wait for the device): their bytes are
    packed into one buffer, widest dtypes first so every piece stays aligned; each result gets
    its own storage."""
    if not tensors:
        return []
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    flat = [tensors[i].contiguous().view(-1) for i in order]
    host = torch.cat([f.view(torch.uint8) if f.dtype != torch.bool else f.to(torch.uint8) for f in flat]).cpu()
    out: list[torch.Tensor | None] = [None] * len(tensors)
    offset = 0
    for i, f in zip(order, flat):
        n = f.numel() * f.element_size()
        piece = host[offset:offset + n]
        # own storage per result: views of one buffer in several dtypes could not be torch.save'd
        out[i] = (piece.view(f.dtype) if f.dtype != torch.bool else piece.bool()).view(tensors[i].shape).clone()
        offset += n
    return out


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
    results, faster). With `precision` "bf16" or "fp16" their weights are converted to that
    dtype (autocast would otherwise convert them on every frame). Build them with
    `models.build_tracker` unless you need to share them.
    """

    def __init__(self, network: GFRTM, backbone: Backbone, target_config: TargetModelConfig,
                 augmenter=None, device: torch.device | str = "cpu", batch_objects: bool = True,
                 seed: int = 0, channels_last: bool = True, precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = check_precision(precision, self.device)  # autocast dtype, None for fp32
        self.network = network.to(self.device).eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.backbone = backbone.to(self.device).eval()
        if channels_last or self.dtype is not None:  # same results, faster convolutions
            self.network.to(memory_format=torch.channels_last)
            self.backbone.use_channels_last()
        self.backbone.fuse_batch_norm()
        if self.dtype is not None:
            self.network.to(self.dtype)
            self.backbone.resnet.to(self.dtype)
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
        """Like run_sequence, but yields each frame's result as soon as it is ready. Reads one
        frame ahead of the one it tracks (that frame's copy to the device overlaps tracking)."""
        sequence = _Sequence()
        for t, (image, labels, new_ids) in enumerate(self._on_device(frames)):
            start = time.perf_counter()
            with torch.no_grad():
                result = self._frame(sequence, t, image, labels, new_ids, float(threshold),
                                     keep_probabilities, keep_raw)
            yield dataclasses.replace(result, seconds=time.perf_counter() - start)

    def track_many(self, sequences: Iterable[tuple[Hashable, Iterable[Frame]]], threshold: float = 0.7,
                   batch: int = 2, keep_probabilities: bool = True,
                   keep_raw: bool = False) -> Iterator[tuple[Hashable, FrameResult]]:
        """Track `batch` sequences in lockstep: each step takes one frame of every open sequence,
        and the frames of one size that start no object go through the backbone's low stages
        in one batch; gates, target models and decoders stay per sequence (each object's reuse
        decision is its own). `sequences` yields (key, frames), frames as `track` takes them;
        yields (key, FrameResult), each sequence's frames in order. A sequence that ends hands
        its slot to the next one. A frame's `seconds` is its share of the step's time."""
        source = iter(sequences)
        slots: list[_Slot] = []
        while True:
            step: list[tuple[_Slot, tuple]] = []
            for slot in slots:
                frame = next(slot.frames, None)
                if frame is not None:
                    step.append((slot, frame))
            slots = [slot for slot, _ in step]
            while len(slots) < batch:  # refill from the next sequences
                nxt = next(source, None)
                if nxt is None:
                    break
                key, frames = nxt
                slot = _Slot(key, self._on_device(frames), _Sequence())
                frame = next(slot.frames, None)
                if frame is not None:
                    slots.append(slot)
                    step.append((slot, frame))
            if not step:
                return
            start = time.perf_counter()
            results = []
            with torch.no_grad():
                # frames where objects start take the start's backbone pass instead
                low = self._batched_low([(slot, frame) for slot, frame in step
                                         if slot.sequence.objects and not slot.sequence.starting(frame[2])])
                for slot, (image, labels, new_ids) in step:
                    results.append(self._frame(slot.sequence, slot.t, image, labels, new_ids, float(threshold),
                                               keep_probabilities, keep_raw, low.get(id(slot))))
                    slot.t += 1
            seconds = (time.perf_counter() - start) / len(step)
            for (slot, _), result in zip(step, results):
                yield slot.key, dataclasses.replace(result, seconds=seconds)

    def _batched_low(self, step: list[tuple["_Slot", tuple]]) -> dict[int, dict]:
        """The low backbone stages of the step's frames, one batch per frame size -> {id(slot):
        that frame's features (batch 1)}."""
        by_size: dict[tuple, list] = {}
        for slot, frame in step:
            by_size.setdefault(tuple(frame[0].shape[-2:]), []).append((slot, frame[0]))
        out = {}
        for group in by_size.values():
            with self._autocast():
                features = self.backbone.low(torch.cat([image for _, image in group]))
            for i, (slot, _) in enumerate(group):
                out[id(slot)] = {k: v[i:i + 1] for k, v in features.items()}
        return out

    def _on_device(self, frames: Iterable[Frame]) -> Iterator[tuple]:
        """(image (1, 3, H, W) on the device, labels (H, W) on the host or None, new ids) per
        frame; the next frame's copy is issued before the current frame is yielded."""
        def send(frame):
            image, labels, new_ids = frame
            labels = None if labels is None else _as_labels(labels)
            return to_device(_as_image(image), self.device), labels, list(new_ids or [])

        source = iter(frames)
        pending = next(source, None)
        pending = None if pending is None else send(pending)
        while pending is not None:
            upcoming = next(source, None)
            current, pending = pending, (None if upcoming is None else send(upcoming))
            yield current

    def _autocast(self):
        return autocast(self.device, self.dtype)

    # ------------------------------------------------------------------------------------------

    def _frame(self, sequence: _Sequence, t: int, image: torch.Tensor, labels: torch.Tensor | None,
               new_ids: list[int], threshold: float, keep_probabilities: bool, keep_raw: bool,
               low: dict | None = None) -> FrameResult:
        """One frame of one sequence; `low`: the frame's low backbone features when already computed."""
        size = image.shape[-2:]
        objects = sequence.objects
        new_ids = sequence.starting(new_ids)
        if new_ids and labels is None:
            raise ValueError(f"frame {t}: objects {new_ids} start here but no labels were given")

        old = list(objects)
        features = None
        new_objects = []
        if new_ids:
            present = set(torch.unique(labels).tolist())  # host labels: no device wait
            empty = [i for i in new_ids if i not in present]
            if empty:
                raise UsageError(f"frame {t}: object {empty[0]} starts here but its mask is empty")
            new_objects, features = self._start_objects(new_ids, t, image, to_device(labels, self.device))
            objects.extend(new_objects)
            sequence.ids = to_device(torch.tensor([0] + [o.id for o in objects], dtype=torch.uint8), self.device)
        if not old:
            return FrameResult(labels=torch.zeros(size, dtype=torch.uint8) if labels is None
                               else labels.to(torch.uint8))

        if features is None:
            features = low
        if features is None:
            with self._autocast():
                features = self.backbone.low(image)
        outputs = {out.obj.id: out for out in self._track_objects(old, features, size, threshold)}

        # Objects starting now claim their masks; older objects are suppressed under them.
        rows = [torch.zeros(size, device=self.device)]
        for obj in objects:
            if obj.start_frame == t:
                rows.append(obj.start_mask)
            else:
                p = outputs[obj.id].probability
                for new in new_objects:
                    p = p * (1 - new.start_mask)
                rows.append(p)
        soft, winner = merge_probabilities(torch.stack(rows))
        labels_out = sequence.ids[labels_from_merge(soft, winner)]
        computed = [(1 + i, o) for i, o in enumerate(objects) if o.id in outputs and not outputs[o.id].reused]
        updates = [soft[row].view(1, 1, *size) for row, _ in computed]
        enough = self.target_config.enough_foreground(torch.cat(updates)) if updates else None

        # One transfer: labels, the update checks, and what the caller asked to keep.
        tracked = [outputs[o.id] for o in old]
        wanted = [labels_out] + ([enough] if updates else [])
        if keep_probabilities:
            wanted.append(torch.stack([out.probability for out in tracked]))
        if keep_raw:
            wanted += [torch.cat([out.score.float() for out in tracked]),
                       torch.cat([out.logits.float() for out in tracked])]
        host = fetch(wanted)
        labels_host = host.pop(0)
        if updates:
            for (_, obj), soft_mask, ok in zip(computed, updates, host.pop(0).numpy()):
                obj.target_model.update(soft_mask, bool(ok))
        ids = [out.obj.id for out in tracked]
        probabilities = dict(zip(ids, host.pop(0))) if keep_probabilities else {}
        scores, logits = {}, {}
        if keep_raw:
            scores = {i: s[None] for i, s in zip(ids, host.pop(0))}
            logits = {i: s[None] for i, s in zip(ids, host.pop(0))}
        return FrameResult(labels=labels_host, probabilities=probabilities,
                           reused={out.obj.id: out.reused for out in tracked},
                           reuse_prob={out.obj.id: out.reuse_prob for out in tracked if out.reuse_prob is not None},
                           scores=scores, logits=logits)

    def _start_objects(self, ids: list[int], t: int, image: torch.Tensor,
                       labels: torch.Tensor) -> tuple[list[_Object], dict]:
        """Initialize the objects starting at frame t -> (their states, the frame's features).
        Their first frames are augmented one by one, then the frame and all augmented images go
        through the backbone in one batch and the target models are trained together."""
        masks = [(labels == obj_id).float().view(1, 1, *labels.shape) for obj_id in ids]
        images, aug_masks = [image], []
        for mask in masks:
            if self.augmenter is not None:
                rng = np.random.default_rng(self.seed)  # each object's augmentation from the same seed
                augmented, augmented_masks = self.augmenter.augmented_frames(image[0], mask[0], rng)
                images.append(augmented)  # uint8, without the frame itself: it comes first, once
                aug_masks.append(augmented_masks)
            else:
                aug_masks.append(mask)
        with self._autocast():  # the backbone takes uint8 images as they are
            all_features = self.backbone(torch.cat(images) if len(images) > 1 else image)
        features = {k: v[:1] for k, v in all_features.items()}
        layer4 = all_features["layer4"]
        k = aug_masks[0].shape[0]
        # Object i's K samples: the frame, then its own K - 1 augmented images (for the first
        # object a slice of the batch). Without augmentation the sample is in NCHW layout: the
        # layout decides which GEMM kernels Gauss-Newton runs, and their rounding is amplified
        # into the tracked masks (see docs/performance.md, "Object starts").
        if k == 1:
            aug_layer4 = [layer4[:1].contiguous()] * len(ids)
        else:
            aug_layer4 = [layer4[:k] if i == 0 else
                          torch.cat([layer4[:1], layer4[1 + i * (k - 1):1 + (i + 1) * (k - 1)]])
                          for i in range(len(ids))]  # O x (K, C, h, w)
        targets = [TargetModel(layer4.shape[1], self.target_config, self.device, seed=self.seed) for _ in ids]
        for i, target in enumerate(targets):  # fp32 whatever the precision
            target.initialize(aug_layer4[i], aug_masks[i])
        return [self._object_state(obj_id, t, mask, target, features)
                for obj_id, mask, target in zip(ids, masks, targets)], features

    def _object_state(self, obj_id: int, t: int, mask4d: torch.Tensor, target: TargetModel,
                      features: dict) -> _Object:
        """An object's tracking state at its first frame: template, score and decoder state."""
        h8, w8 = features["layer3"].shape[-2:]
        h16, w16 = features["layer4"].shape[-2:]
        score = target.apply(features["layer4"])
        with self._autocast():
            template = None
            if self.network.has_gate:
                template = self.network.make_template(features["layer3"],
                                                      F.interpolate(mask4d, (h8, w8), mode="nearest"))
            x16 = self.network.deep_stages(features, score)
        return _Object(obj_id, t, mask4d[0, 0], target, template, F.interpolate(mask4d, (h16, w16), mode="nearest"),
                       x16)

    def _gates(self, groups: list[list[_Object]], layer3: torch.Tensor,
               threshold: float) -> tuple[list[torch.Tensor | None], list[list[float | None]]]:
        """Template matching and reuse-gate probabilities of every group: (matched (B, 64, H8, W8)
        or None per group, reuse probability per object or None where the gate does not run).
        All gate decisions of the frame come to the host in one transfer."""
        if not self.network.has_gate or threshold >= 1:  # with threshold >= 1 nothing can be reused
            return [None] * len(groups), [[None] * len(g) for g in groups]
        net = self.network
        h8, w8 = layer3.shape[-2:]
        matched, p_reuse = [], []
        with self._autocast():
            for group in groups:
                prev = F.interpolate(torch.cat([o.prev_score for o in group]), (h8, w8), mode="bilinear",
                                     align_corners=False)
                m = net.match(layer3, prev, torch.cat([o.template for o in group]))
                matched.append(m)
                p_reuse.append(torch.softmax(net.gate_logits(m).float(), dim=1)[:, 0])
        flat = torch.cat(p_reuse).tolist()
        probs, k = [], 0
        for group in groups:
            probs.append(flat[k:k + len(group)])
            k += len(group)
        return matched, probs

    def _track_objects(self, objs: list[_Object], features: dict, size, threshold: float) -> list[_Output]:
        """Gate, score and decode the already started objects -> their outputs (device tensors).
        Updates each object's carried state (previous score, decoder state)."""
        net = self.network
        groups = [objs] if self.batch_objects else [[o] for o in objs]
        matched, p_reuse = self._gates(groups, features["layer3"], threshold)
        outputs: list[_Output] = []
        for group, group_matched, group_p in zip(groups, matched, p_reuse):
            reuse = [p is not None and p > threshold for p in group_p]
            computed = [i for i, r in enumerate(reuse) if not r]
            reused = [i for i, r in enumerate(reuse) if r]
            if computed:
                if "layer4" not in features:  # high backbone once per frame, shared by all objects
                    with self._autocast():
                        features = {**features, **self.backbone.high(features["layer3"])}
                scores = torch.cat([group[i].target_model.apply(features["layer4"]) for i in computed])
                with self._autocast():
                    logits, x16 = net.decode_computed(features, scores, size)
                probs = torch.sigmoid(logits.float())  # fp32: the merge needs it
                for j, i in enumerate(computed):
                    obj = group[i]
                    obj.prev_score, obj.x16 = scores[j:j + 1], x16[j:j + 1]
                    outputs.append(_Output(obj, False, probs[j, 0], scores[j:j + 1], logits[j:j + 1], group_p[i]))
            if reused:
                with self._autocast():
                    delta = net.delta(_rows(group_matched, reused))
                    scores = torch.cat([group[i].prev_score for i in reused]) + delta.float()
                    x16_prev = torch.cat([group[i].x16 for i in reused])
                    logits, x16 = net.decode_reused(features, scores, x16_prev, delta, size)
                probs = torch.sigmoid(logits.float())
                for j, i in enumerate(reused):
                    group[i].x16 = x16[j:j + 1]
                    outputs.append(_Output(group[i], True, probs[j, 0], scores[j:j + 1], logits[j:j + 1], group_p[i]))
        return outputs


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """t[index] for a short host list of row indices, by slices (no index tensor to copy to the device)."""
    if index == list(range(t.shape[0])):
        return t
    return torch.cat([t[i:i + 1] for i in index])


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
