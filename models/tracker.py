"""Multi-object G-FRTM inference driver (Park et al., CVPR 2021), built on the step methods of `GFRTM`.

Per tracked object and frame: template matching and the reuse gate decide between
* computed: target-model score on the high backbone features (run once per frame for all
  computing objects), full decoder, target-model update;
* reused: previous score + Δ, refine-translated decoder state, shallow decoder stages only.
Objects are batched through the network by default; `batch_objects=False` runs them one by one
(same outputs, used by the tests). `track_many` steps several sequences together, their frames and
objects batched the same way (`_step` serves both).

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
from lib.precision import autocast, check_precision, to_device

from .backbone import Backbone
from .merge import labels_from_merge, merge_probabilities  # noqa: F401 (merge_probabilities: re-exported)
from .network import GFRTM
from .regions import Regions
from .target_model import TargetModelConfig, TargetModelTable, pad_to_bucket, row_index

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
    table: TargetModelTable  # its target model is row `row` of this table
    row: int
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


@dataclass
class _Entry:
    """One sequence's frame in a tracking step."""

    sequence: _Sequence
    t: int
    image: torch.Tensor  # (1, 3, H, W) on the device
    labels: torch.Tensor | None  # (H, W) on the host
    new_ids: list[int]
    features: dict | None = None  # level -> (1, C, h, w), when already computed
    low_batch: dict | None = None  # the `_batched_low` batch `features` are row `low_row` of
    low_row: int = 0
    tracked: list[_Object] = field(default_factory=list)  # objects tracked before this frame
    started: list[_Object] = field(default_factory=list)  # objects starting on this frame


@dataclass
class _Group:
    """Objects gated, scored and decoded together: those of frames of one size (or a single
    object when objects are not batched). `rows` maps each object to its frame's row in
    `features`."""

    features: dict  # level -> (F, C, h, w)
    objects: list[_Object]
    rows: list[int]
    size: tuple[int, int]  # (H, W) of the frames

    @property
    def frames(self) -> int:
        return self.features["layer3"].shape[0]


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


def build_regions(network: GFRTM, backbone: Backbone, device: torch.device, compile: bool | str = False) -> Regions:
    """The regions a tracker runs its per-frame work through (models.regions): eager, or with
    `compile` torch.compiled (True: inductor, else the backend named; models.compiled). Another
    runtime plugs in here."""
    if not compile:
        return Regions(network, backbone)
    from .compiled import CompiledRegions
    return CompiledRegions(network, backbone, device, "inductor" if compile is True else compile)


def _for_inference(network: GFRTM, backbone: Backbone, device: torch.device, dtype: torch.dtype | None,
                   channels_last: bool) -> tuple[GFRTM, Backbone]:
    """The network and the backbone moved to `device`, frozen, in eval mode, channels-last (same
    results, faster convolutions), the backbone's batch norm folded, in `dtype` when given."""
    network = network.to(device).eval()
    network.requires_grad_(False)
    backbone = backbone.to(device).eval()
    if channels_last or dtype is not None:
        network.to(memory_format=torch.channels_last)
        backbone.use_channels_last()
    backbone.fuse_batch_norm()
    if dtype is not None:
        network.to(dtype)
        backbone.resnet.to(dtype)
    return network, backbone


class Tracker:
    """G-FRTM (or plain FRTM, when the network has no gate) video object segmenter.

    Takes ownership of `network` and `backbone`: they are moved to `device`, switched to
    channels-last, and the backbone's batch norm is folded into its convolutions (same
    results, faster). With `precision` "bf16" or "fp16" their weights are converted to that
    dtype (autocast would otherwise convert them on every frame). Build them with
    `models.build_tracker` unless you need to share them. Every piece of per-frame work runs
    through `self.regions` (models.regions), built by `build_regions`: eager, or with `compile`
    torch.compiled (True: inductor, or a backend's name; models.compiled).
    """

    def __init__(self, network: GFRTM, backbone: Backbone, target_config: TargetModelConfig,
                 augmenter=None, device: torch.device | str = "cpu", batch_objects: bool = True,
                 seed: int = 0, channels_last: bool = True, precision: str = "fp32", compile: bool | str = False):
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = check_precision(precision, self.device)  # autocast dtype, None for fp32
        self.network, self.backbone = _for_inference(network, backbone, self.device, self.dtype, channels_last)
        self.target_config, self.augmenter = target_config, augmenter
        self.batch_objects, self.seed = batch_objects, seed
        self.regions = build_regions(self.network, self.backbone, self.device, compile)
        # The objects' target models, one table per frame size (and target-model settings) while
        # objects of that size are tracked: rows of finished sequences are handed back and taken
        # by later objects.
        self.tables: dict[tuple, TargetModelTable] = {}

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
        try:
            for t, (image, labels, new_ids) in enumerate(self._on_device(frames)):
                start = time.perf_counter()
                with torch.no_grad():
                    (result,) = self._step([_Entry(sequence, t, image, labels, new_ids)], float(threshold),
                                           keep_probabilities, keep_raw)
                yield dataclasses.replace(result, seconds=time.perf_counter() - start)
        finally:
            self._release(sequence)

    def track_many(self, sequences: Iterable[tuple[Hashable, Iterable[Frame]]], threshold: float = 0.7,
                   batch: int = 2, keep_probabilities: bool = True,
                   keep_raw: bool = False) -> Iterator[tuple[Hashable, FrameResult]]:
        """Track `batch` sequences in lockstep: each step takes one frame of every open sequence;
        the frames of one size go through the backbone together, and their objects through
        template matching, the reuse gate and the decoder (each object's reuse decision is its
        own). `sequences` yields (key, frames), frames as `track` takes them; yields (key,
        FrameResult), each sequence's frames in order. A sequence that ends hands its slot to
        the next one. A frame's `seconds` is its share of the step's time."""
        source = iter(sequences)
        slots: list[_Slot] = []
        try:
            while True:
                step: list[tuple[_Slot, tuple]] = []
                for slot in slots:
                    frame = next(slot.frames, None)
                    if frame is None:
                        self._release(slot.sequence)
                    else:
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
                entries = [_Entry(slot.sequence, slot.t, *frame) for slot, frame in step]
                with torch.no_grad():
                    # frames where objects start take the start's backbone pass instead
                    self._batched_low([e for e in entries if e.sequence.objects and not e.sequence.starting(e.new_ids)])
                    results = self._step(entries, float(threshold), keep_probabilities, keep_raw)
                seconds = (time.perf_counter() - start) / len(step)
                for (slot, _), result in zip(step, results):
                    slot.t += 1
                    yield slot.key, dataclasses.replace(result, seconds=seconds)
        finally:
            for slot in slots:
                self._release(slot.sequence)

    def _batched_low(self, entries: list[_Entry]) -> None:
        """The low backbone stages of the entries' frames, one batch per frame size; each entry
        gets its rows (views)."""
        by_size: dict[tuple, list[_Entry]] = {}
        for entry in entries:
            by_size.setdefault(tuple(entry.image.shape[-2:]), []).append(entry)
        for group in by_size.values():
            with self._autocast():
                features = self.regions.backbone_low(torch.cat([e.image for e in group]))
            for i, entry in enumerate(group):
                entry.features = {k: v[i:i + 1] for k, v in features.items()}
                entry.low_batch, entry.low_row = features, i

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

    def _step(self, entries: list[_Entry], threshold: float, keep_probabilities: bool,
              keep_raw: bool) -> list[FrameResult]:
        """One frame of each entry's sequence: objects start (sequence by sequence), then the
        tracked objects of all frames are gated (one transfer for all decisions), scored and
        decoded in groups (`_groups`), merged into labels (`_merge`), and the labels and the
        target models' update checks of all frames come to the host in one more transfer."""
        for entry in entries:
            self._start(entry)
        tracking = [e for e in entries if e.tracked]
        for entry in tracking:
            if entry.features is None:
                with self._autocast():
                    entry.features = self.regions.backbone_low(entry.image)
        groups = self._groups(tracking)
        matched, p_reuse = self._gates(groups, threshold)
        outputs: dict[int, _Output] = {}  # id(object) -> its output
        for group, group_matched, group_p in zip(groups, matched, p_reuse):
            for out in self._decode(group, group_matched, group_p, threshold):
                outputs[id(out.obj)] = out

        labels, computed = self._merge(tracking, outputs)
        updates: dict[int, list] = {}  # the target models' update samples, by table (frame size)
        for frame in computed:
            for obj, soft_mask in frame:
                updates.setdefault(id(obj.table), []).append((obj, soft_mask))
        update_masks = [torch.cat([m for _, m in u]) for u in updates.values()]
        wanted = [self.target_config.enough_foreground(masks) for masks in update_masks]
        for entry, frame_labels in zip(tracking, labels):
            tracked = [outputs[id(o)] for o in entry.tracked]
            wanted.append(frame_labels)
            wanted.append(torch.stack([out.probability for out in tracked]) if keep_probabilities else None)
            wanted.append(torch.cat([out.score.float() for out in tracked]) if keep_raw else None)
            wanted.append(torch.cat([out.logits.float() for out in tracked]) if keep_raw else None)
        host = iter(_fetch_some(wanted))
        for samples, masks in zip(updates.values(), update_masks):
            samples[0][0].table.update([obj.row for obj, _ in samples], masks, next(host).tolist())

        results = []
        for entry in entries:
            if not entry.tracked:
                results.append(FrameResult(labels=torch.zeros(entry.image.shape[-2:], dtype=torch.uint8)
                                           if entry.labels is None else entry.labels.to(torch.uint8)))
                continue
            frame_labels, probabilities, scores, logits = (next(host) for _ in range(4))
            tracked = [outputs[id(o)] for o in entry.tracked]
            ids = [out.obj.id for out in tracked]
            results.append(FrameResult(
                labels=frame_labels, probabilities=dict(zip(ids, probabilities)) if keep_probabilities else {},
                reused={out.obj.id: out.reused for out in tracked},
                reuse_prob={out.obj.id: out.reuse_prob for out in tracked if out.reuse_prob is not None},
                scores={i: s[None] for i, s in zip(ids, scores)} if keep_raw else {},
                logits={i: s[None] for i, s in zip(ids, logits)} if keep_raw else {}))
        self.regions.report(dict.fromkeys(tuple(e.image.shape[-2:]) for e in entries))
        return results

    def _merge(self, entries: list[_Entry], outputs: dict[int, _Output]
               ) -> tuple[list[torch.Tensor], list[list[tuple[_Object, torch.Tensor]]]]:
        """Merge each frame's object probabilities into labels, frames of the same size and
        object count together. Objects starting on a frame claim their masks, older objects are
        suppressed under them. -> per entry: labels (H, W) uint8 ids on the device, and
        (object, its kept soft mask (1, 1, H, W)) for each object computed on that frame (the
        target-model update's sample)."""
        by_kind: dict[tuple, list[int]] = {}
        for i, entry in enumerate(entries):
            by_kind.setdefault((tuple(entry.image.shape[-2:]), len(entry.sequence.objects)), []).append(i)
        labels: list = [None] * len(entries)
        computed: list = [None] * len(entries)
        for (size, _), members in by_kind.items():
            rows = []
            for i in members:
                entry = entries[i]
                rows.append(torch.zeros(size, device=self.device))
                for obj in entry.sequence.objects:
                    if obj.start_frame == entry.t:
                        rows.append(obj.start_mask)
                        continue
                    p = outputs[id(obj)].probability
                    for new in entry.started:
                        p = p * (1 - new.start_mask)
                    rows.append(p)
            p = torch.stack(rows)
            soft, winner = self.regions.merge_probabilities(p.view(len(members), -1, *size) if len(members) > 1 else p)
            merged = labels_from_merge(soft, winner)
            ids = entries[members[0]].sequence.ids if len(members) == 1 else \
                torch.stack([entries[i].sequence.ids for i in members])
            if len(members) == 1:
                soft, merged = soft[None], ids[merged][None]
            else:
                merged = ids.gather(1, merged.flatten(1)).view(merged.shape)
            for j, i in enumerate(members):
                labels[i] = merged[j]
                computed[i] = [(o, soft[j, 1 + k].view(1, 1, *size)) for k, o in enumerate(entries[i].sequence.objects)
                               if id(o) in outputs and not outputs[id(o)].reused]
        return labels, computed

    def _start(self, entry: _Entry) -> None:
        """Start the entry's new objects (their target models trained on the augmented frame);
        sets the entry's tracked and started objects, and its features when a start computed them."""
        sequence, t, labels = entry.sequence, entry.t, entry.labels
        new_ids = sequence.starting(entry.new_ids)
        if new_ids and labels is None:
            raise ValueError(f"frame {t}: objects {new_ids} start here but no labels were given")
        entry.tracked = list(sequence.objects)
        if not new_ids:
            return
        present = set(torch.unique(labels).tolist())  # host labels: no device wait
        empty = [i for i in new_ids if i not in present]
        if empty:
            raise UsageError(f"frame {t}: object {empty[0]} starts here but its mask is empty")
        entry.started, entry.features = self._start_objects(new_ids, t, entry.image, to_device(labels, self.device))
        sequence.objects.extend(entry.started)
        sequence.ids = to_device(torch.tensor([0] + [o.id for o in sequence.objects], dtype=torch.uint8), self.device)

    def _groups(self, entries: list[_Entry]) -> list[_Group]:
        """The entries' tracked objects in groups: with `batch_objects`, one group per frame size
        (frames whose start already computed the high backbone levels apart); else one per object."""
        if not self.batch_objects:
            return [_Group(e.features, [obj], [0], tuple(e.image.shape[-2:])) for e in entries for obj in e.tracked]
        by_kind: dict[tuple, list[_Entry]] = {}
        for entry in entries:
            by_kind.setdefault((tuple(entry.image.shape[-2:]), "layer4" in entry.features), []).append(entry)
        groups = []
        for group in by_kind.values():
            features = _stack(group)
            objects = [obj for e in group for obj in e.tracked]
            rows = [i for i, e in enumerate(group) for _ in e.tracked]
            groups.append(_Group(features, objects, rows, tuple(group[0].image.shape[-2:])))
        return groups

    def _padded(self, items: list) -> list:
        """`items` (a batch's objects or their rows) as the network's compiled regions take them
        with `row_buckets` (models.regions): the last one repeated up to a power-of-two count, so
        that each region compiles for few batch sizes (the extra outputs are discarded); else
        `items` itself."""
        if not self.regions.row_buckets:
            return items
        return pad_to_bucket(items)

    def _row_index(self, rows: list[int], frames: int) -> torch.Tensor | None:
        """Object -> frame row index for the network's step methods; None where features of one
        frame are shared by all objects or rows are the frames in order (no gather needed)."""
        if frames == 1 or rows == list(range(frames)):
            return None
        return row_index(tuple(rows), self.device)

    def _gates(self, groups: list[_Group], threshold: float
               ) -> tuple[list[torch.Tensor | None], list[list[float | None]]]:
        """Template matching and reuse-gate probabilities of every group: (matched (N, 64, H8, W8)
        or None per group, reuse probability per object or None where the gate does not run).
        All gate decisions of the step come to the host in one transfer."""
        if not groups or not self.network.has_gate or threshold >= 1:  # threshold >= 1: nothing reused
            return [None] * len(groups), [[None] * len(g.objects) for g in groups]
        regions = self.regions
        matched, p_reuse = [], []
        with self._autocast():
            for group in groups:
                layer3 = group.features["layer3"]
                objs, rows = self._padded(group.objects), self._padded(group.rows)
                prev = F.interpolate(torch.cat([o.prev_score for o in objs]), layer3.shape[-2:],
                                     mode="bilinear", align_corners=False)
                m = regions.match(layer3, prev, torch.cat([o.template for o in objs]), self._row_index(rows, group.frames))
                n = len(group.objects)
                matched.append(m[:n])
                p_reuse.append(torch.softmax(regions.gate_logits(m).float(), dim=1)[:n, 0])
        flat = torch.cat(p_reuse).tolist()
        probs, k = [], 0
        for group in groups:
            probs.append(flat[k:k + len(group.objects)])
            k += len(group.objects)
        return matched, probs

    def _decode(self, group: _Group, matched: torch.Tensor | None, p_reuse: list[float | None],
                threshold: float) -> list[_Output]:
        """Score and decode a group's objects on their gate decisions -> their outputs (device
        tensors). Updates each object's carried state (previous score, decoder state)."""
        regions = self.regions
        objs, rows, size = group.objects, group.rows, group.size
        reuse = [p is not None and p > threshold for p in p_reuse]
        computed = [i for i, r in enumerate(reuse) if not r]
        reused = [i for i, r in enumerate(reuse) if r]
        outputs: list[_Output] = []
        if computed:
            # the high backbone levels once per frame with a computing object, shared by its objects
            frames = sorted({rows[i] for i in computed})
            features = {k: _rows(v, frames) for k, v in group.features.items()}
            if "layer4" not in features:
                with self._autocast():
                    features.update(regions.backbone_high(features["layer3"]))
            local = [frames.index(rows[i]) for i in computed]
            index = self._row_index(local, len(frames))
            scores = objs[computed[0]].table.scores([objs[i].row for i in computed], features["layer4"], index)
            padded = self._padded(local)
            with self._autocast():
                logits, x16 = regions.decode_computed(features, _pad(scores, len(padded)), size,
                                                  index if padded is local else self._row_index(padded, len(frames)))
            logits, x16 = logits[:len(computed)], x16[:len(computed)]
            probs = torch.sigmoid(logits.float())  # fp32: the merge needs it
            for j, i in enumerate(computed):
                obj = objs[i]
                obj.prev_score, obj.x16 = scores[j:j + 1], x16[j:j + 1]
                outputs.append(_Output(obj, False, probs[j, 0], scores[j:j + 1], logits[j:j + 1], p_reuse[i]))
        if reused:
            padded = self._padded(reused)
            with self._autocast():
                delta = regions.delta(_rows(matched, padded))
                scores = torch.cat([objs[i].prev_score for i in padded]) + delta.float()
                x16_prev = torch.cat([objs[i].x16 for i in padded])
                logits, x16 = regions.decode_reused(group.features, scores, x16_prev, delta, size,
                                                self._row_index([rows[i] for i in padded], group.frames))
            scores, logits, x16 = scores[:len(reused)], logits[:len(reused)], x16[:len(reused)]
            probs = torch.sigmoid(logits.float())
            for j, i in enumerate(reused):
                objs[i].x16 = x16[j:j + 1]
                outputs.append(_Output(objs[i], True, probs[j, 0], scores[j:j + 1], logits[j:j + 1], p_reuse[i]))
        return outputs

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
        with self._autocast():  # the backbone takes uint8 images as they are; starts run eagerly (models.regions)
            all_features = self.regions.start_features(torch.cat(images) if len(images) > 1 else image)
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
        table = self._table(labels.shape, layer4)
        rows = table.add(aug_layer4, aug_masks)  # fp32 whatever the precision
        scores = table.scores(rows, features["layer4"])
        return [self._object_state(obj_id, t, mask, table, row, scores[i:i + 1], features)
                for i, (obj_id, mask, row) in enumerate(zip(ids, masks, rows))], features

    def _table(self, size: tuple[int, int], layer4: torch.Tensor) -> TargetModelTable:
        """The target-model table of frames of `size` (H, W), with stride-16 features like layer4."""
        key = (tuple(size), self.target_config, self.seed)
        if key not in self.tables:
            self.tables[key] = TargetModelTable(layer4.shape[1], self.target_config, tuple(layer4.shape[-2:]),
                                                tuple(size), self.device, seed=self.seed,
                                                score_fn=self.regions.target_scores,
                                                optimizer_fn=self.regions.optimize_filters,
                                                static_shapes=self.regions.static_shapes)
        return self.tables[key]

    def _release(self, sequence: _Sequence) -> None:
        """Hand the rows of a finished sequence's target models back to their tables; a table
        no object holds any more is dropped (its memories are large, and a data set of many
        frame sizes would keep one per size)."""
        for obj in sequence.objects:
            obj.table.release([obj.row])
        sequence.objects = []
        for key, table in list(self.tables.items()):
            if len(table.free) == table.capacity:
                del self.tables[key]

    def _object_state(self, obj_id: int, t: int, mask4d: torch.Tensor, table: TargetModelTable, row: int,
                      score: torch.Tensor, features: dict) -> _Object:
        """An object's tracking state at its first frame: template, score (1, 1, h16, w16) and
        decoder state."""
        h8, w8 = features["layer3"].shape[-2:]
        h16, w16 = features["layer4"].shape[-2:]
        with self._autocast():
            template = None
            if self.network.has_gate:
                template = self.regions.make_template(features["layer3"],
                                                      F.interpolate(mask4d, (h8, w8), mode="nearest"))
            x16 = self.regions.deep_stages(features, score)
        return _Object(obj_id, t, mask4d[0, 0], table, row, template,
                       F.interpolate(mask4d, (h16, w16), mode="nearest"), x16)


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (B, ...) with its last row repeated up to n rows (`Tracker._padded`)."""
    return t if t.shape[0] == n else torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


def _rows(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """t[index] for a short host list of row indices, by slices (no index tensor to copy to the device)."""
    if index == list(range(t.shape[0])):
        return t
    if len(index) == 1:
        return t[index[0]:index[0] + 1]
    return torch.cat([t[i:i + 1] for i in index])


def _stack(entries: list[_Entry]) -> dict:
    """The entries' frame features -> level -> (F, C, h, w). Frames that are all the rows of one
    `_batched_low` batch, in order, give that batch back without a copy."""
    if len(entries) == 1:
        return entries[0].features
    batch = entries[0].low_batch
    if batch is not None and all(e.low_batch is batch for e in entries) and \
            [e.low_row for e in entries] == list(range(batch["layer3"].shape[0])):
        return batch
    return {level: torch.cat([e.features[level] for e in entries]) for level in entries[0].features}


def _fetch_some(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """`fetch` of the tensors that are not None, in one transfer; None stays None."""
    host = iter(fetch([t for t in tensors if t is not None]))
    return [None if t is None else next(host) for t in tensors]


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
