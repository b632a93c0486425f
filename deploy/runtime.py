"""The tracker's host loop over the exported graphs (`export.py`), run by onnxruntime: no PyTorch.

The graphs do the tensor work (`models/graphs.py`); this loop keeps what the PyTorch tracker
(`models/tracker.py`) keeps on the host: which objects start on a frame (their first-frame
augmentation, `lib.augmentation`), the reuse decision (p_reuse > threshold), which objects
compute, the target models' sample memories and slot choice (`lib.sample_memory`), when a filter
re-optimisation is due, and the label ids of the merge. One sequence at a time; its objects are
batched through every graph, as the PyTorch tracker batches them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnxruntime as ort

from lib.augmentation import HostAugmenter, evaluation_params
from lib.errors import UsageError
from lib.image_io import host_image
from lib.manifest import GATE_GRAPHS, GRAPHS, graph_file, read_manifest
from lib.sample_memory import first_sample_weights, next_slot


@dataclass
class FrameResult:
    """One frame's output, as `models.FrameResult` with numpy arrays."""

    labels: np.ndarray  # (H, W) uint8 object ids
    probabilities: dict[int, np.ndarray] = field(default_factory=dict)  # id -> (H, W), with keep_probabilities
    reused: dict[int, bool] = field(default_factory=dict)  # id -> reused, objects tracked in this frame
    reuse_prob: dict[int, float] = field(default_factory=dict)  # id -> reuse-gate probability
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # id -> decoder input score (1, 1, h16, w16)
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # id -> mask logits (1, 1, H, W)
    seconds: float = 0.0


@dataclass
class _Object:
    """One tracked object: its target model (θ, sample memory, optimizer state) and decoder state."""

    id: int
    start_frame: int
    start_mask: np.ndarray  # (H, W) float32
    project: np.ndarray  # (c, C)
    filters: np.ndarray  # (c, 9)
    direction: np.ndarray  # (9 c,)
    rho: np.ndarray  # (1,)
    residual: np.ndarray  # (9 c,)
    samples: np.ndarray  # (S, h w, c) projected samples
    metrics: np.ndarray  # (S, 9, h, w)
    targets: np.ndarray  # (S, 1, h, w)
    weights: np.ndarray  # (S,) float32 sample weights
    size: int  # filled slots (a prefix)
    template: np.ndarray | None  # (1, 64, 64)
    prev_score: np.ndarray  # (1, 1, h, w)
    x16: np.ndarray  # (1, 64, h, w)
    current: np.ndarray | None = None  # (h w, c) the last projected sample
    last_slot: int = -1
    applications: int = 0


class ExportedTracker:
    """G-FRTM / FRTM from an exported folder. `threads`: onnxruntime's intra-op threads (None:
    its choice). `providers`: onnxruntime execution providers (default CPU)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None,
                 providers: list[str] | None = None, flag: str = "--model"):
        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder, flag)
        m = self.manifest
        self.has_gate = bool(m["has_gate"])
        cfg = m["target_model"]
        self.memory_size = int(cfg["memory_size"])
        self.learning_rate = float(cfg["learning_rate"])
        self.train_skipping = int(cfg["train_skipping"])
        self.seed = int(m["seed"])
        self.augmenter = HostAugmenter(evaluation_params(int(m["num_aug"]))) if int(m["num_aug"]) > 1 else None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its constant-folding notes are not for users
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        names = GRAPHS + (GATE_GRAPHS if self.has_gate else ())
        paths = {name: graph_file(self.folder, m, name, flag) for name in names}
        self.sessions = {}
        for name, path in paths.items():
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers or
                                                           ["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own types for unreadable graphs
                raise UsageError(f"{flag}: graph {path} cannot be loaded by onnxruntime ({exc}); export again "
                                 f"with export.py") from exc
        self.outputs = {name: m["graphs"][name]["outputs"] for name in names}

    def run(self, name: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run graph `name` -> its outputs by name."""
        values = self.sessions[name].run(None, inputs)
        return dict(zip(self.outputs[name], values))

    # ------------------------------------------------------------------------------------------

    def track(self, frames: Iterable[tuple], threshold: float = 0.7, keep_probabilities: bool = False,
              keep_raw: bool = False) -> Iterator[FrameResult]:
        """Segment a sequence: frames yields (image, labels uint8 (H, W) or None, new object ids),
        labels needed where objects start; the image a uint8 (H, W, 3) numpy array, or (3, H, W)
        as `models.Tracker.track` also takes it (e.g. a CPU tensor: any array that is not numpy).
        Yields each frame's result; `keep_probabilities`: with each object's probability map
        (before the merge), as models.Tracker's results. The interface of `models.Tracker.track`,
        so that evaluate.py and demo.py run either."""
        objects: list[_Object] = []
        for t, (image, labels, new_ids) in enumerate(frames):
            start = time.perf_counter()
            result = self._step(objects, t, host_image(image), labels, list(new_ids or []), float(threshold),
                                keep_probabilities, keep_raw)
            result.seconds = time.perf_counter() - start
            yield result

    def _step(self, objects: list[_Object], t: int, image: np.ndarray, labels, new_ids: list[int],
              threshold: float, keep_probabilities: bool, keep_raw: bool) -> FrameResult:
        frame = np.ascontiguousarray(image.transpose(2, 0, 1)[None])  # (1, 3, H, W)
        known = {o.id for o in objects}
        new_ids = [i for i in new_ids if i not in known]
        tracked = list(objects)
        features: dict[str, np.ndarray] = {}
        started: list[_Object] = []
        if new_ids:
            if labels is None:
                raise ValueError(f"frame {t}: objects {new_ids} start here but no labels were given")
            labels = np.asarray(labels).reshape(image.shape[:2])
            present = set(np.unique(labels).tolist())
            empty = [i for i in new_ids if i not in present]
            if empty:
                raise UsageError(f"frame {t}: object {empty[0]} starts here but its mask is empty")
            started, features = self._start(new_ids, t, image, frame, labels)
            objects.extend(started)
        if not tracked:
            return FrameResult(labels=np.zeros(image.shape[:2], np.uint8) if labels is None else
                               np.asarray(labels, np.uint8))
        if "layer3" not in features:
            features["layer2"], features["layer3"] = self.run("backbone_low", image=frame).values()
        reuse_prob: list[float | None] = [None] * len(tracked)
        matched = None
        if self.has_gate and threshold < 1:  # threshold >= 1: nothing reused
            out = self.run("gate", layer3=features["layer3"], prev_score=_cat(o.prev_score for o in tracked),
                           template=_cat(o.template for o in tracked))
            matched, reuse_prob = out["matched"], out["reuse_prob"].tolist()
        reuse = [p is not None and p > threshold for p in reuse_prob]
        computed = [i for i, r in enumerate(reuse) if not r]
        reused = [i for i, r in enumerate(reuse) if r]
        probability: dict[int, np.ndarray] = {}
        raw_scores, raw_logits = {}, {}
        if computed:
            if "layer4" not in features:
                features["layer4"], features["layer5"] = self.run("backbone_high", layer3=features["layer3"]).values()
            scores = self._scores([tracked[i] for i in computed], features["layer4"])
            out = self.run("decode_computed", image=frame, scores=scores, **features)
            for j, i in enumerate(computed):
                obj = tracked[i]
                obj.prev_score, obj.x16 = scores[j:j + 1], out["x16"][j:j + 1]
                probability[i], raw_scores[i], raw_logits[i] = out["probability"][j], scores[j:j + 1], \
                    out["logits"][j:j + 1]
        if reused:
            out = self.run("decode_reused", image=frame, layer2=features["layer2"], layer3=features["layer3"],
                           matched=matched[reused], prev_score=_cat(tracked[i].prev_score for i in reused),
                           x16_prev=_cat(tracked[i].x16 for i in reused))
            for j, i in enumerate(reused):
                probability[i], raw_scores[i], raw_logits[i] = out["probability"][j], out["scores"][j:j + 1], \
                    out["logits"][j:j + 1]

        # the merge: objects starting here claim their masks, older objects are suppressed under them
        rows = [np.zeros(image.shape[:2], np.float32)]
        for obj in objects:
            if obj.start_frame == t:
                rows.append(obj.start_mask)
                continue
            p = probability[tracked.index(obj)]
            for new in started:
                p = p * (1 - new.start_mask)
            rows.append(p)
        out = self.run("merge", p=np.stack(rows))
        ids = np.array([0] + [o.id for o in objects], np.uint8)
        frame_labels = ids[out["labels"]]
        self._update([(tracked[i], out["soft"][1 + objects.index(tracked[i])]) for i in computed])

        ids_tracked = [o.id for o in tracked]
        return FrameResult(
            labels=frame_labels, reused=dict(zip(ids_tracked, reuse)),
            probabilities={ids_tracked[i]: p for i, p in probability.items()} if keep_probabilities else {},
            reuse_prob={i: p for i, p in zip(ids_tracked, reuse_prob) if p is not None},
            scores={ids_tracked[i]: s for i, s in raw_scores.items()} if keep_raw else {},
            logits={ids_tracked[i]: s for i, s in raw_logits.items()} if keep_raw else {})

    def _scores(self, objs: list[_Object], layer4: np.ndarray) -> np.ndarray:
        """The objects' target-model scores (N, 1, h, w) on a frame's layer4; each remembers its
        projected sample (the next memory insert's) and counts the application."""
        out = self.run("target_scores", layer4=layer4, project=np.stack([o.project for o in objs]),
                       filters=np.stack([o.filters for o in objs]))
        for j, obj in enumerate(objs):
            obj.current = out["z"][j]
            obj.applications += 1
        return out["scores"]

    def _start(self, ids: list[int], t: int, image: np.ndarray, frame: np.ndarray,
               labels: np.ndarray) -> tuple[list[_Object], dict]:
        """Objects starting at frame t, their target models trained on the (augmented) frame ->
        (their states, the frame's features)."""
        masks = [(labels == i).astype(np.float32) for i in ids]
        images, aug_masks = [frame], []
        for mask in masks:
            if self.augmenter is not None:
                rng = np.random.default_rng(self.seed)  # each object's augmentation from the same seed
                augmented, augmented_masks = self.augmenter.host_frames(image, mask, rng)
                images.append(augmented.transpose(0, 3, 1, 2))
                aug_masks.append(augmented_masks)
            else:
                aug_masks.append(mask[None, None])
        batch = np.ascontiguousarray(np.concatenate(images)) if len(images) > 1 else frame
        layer2, layer3 = self.run("backbone_low", image=batch).values()
        layer4, layer5 = self.run("backbone_high", layer3=layer3).values()
        features = {"layer2": layer2[:1], "layer3": layer3[:1], "layer4": layer4[:1], "layer5": layer5[:1]}
        k = aug_masks[0].shape[0]
        samples = [layer4[:1] if k == 1 else
                   np.concatenate([layer4[:1], layer4[1 + i * (k - 1):1 + (i + 1) * (k - 1)]]) for i in range(len(ids))]
        init = self.run("target_init", features=np.stack(samples), masks=np.concatenate(aug_masks),
                        sample_weights=first_sample_weights(k))
        h, w = init["metrics"].shape[-2:]
        channels = init["samples"].shape[-1]
        split = init["theta"].shape[1] - 9 * channels
        s = self.memory_size
        objects = []
        for i, (obj_id, mask) in enumerate(zip(ids, masks)):
            memory = {"samples": np.zeros((s, h * w, channels), np.float32), "metrics": np.zeros((s, 9, h, w), np.float32),
                      "targets": np.zeros((s, 1, h, w), np.float32), "weights": np.zeros(s, np.float32)}
            for name in ("samples", "metrics", "targets"):
                memory[name][:k] = init[name][i]
            memory["weights"][:k] = first_sample_weights(k)
            theta = init["theta"][i]
            objects.append(_Object(obj_id, t, mask, theta[:split].reshape(channels, -1), theta[split:].reshape(channels, 9),
                                   init["direction"][i], init["rho"][i], init["residual"][i], size=k, template=None,
                                   prev_score=None, x16=None, **memory))
        scores = self._scores(objects, features["layer4"])
        out = self.run("object_start", masks=np.stack(masks)[:, None], scores=scores, **features)
        for j, obj in enumerate(objects):
            obj.x16, obj.prev_score = out["x16"][j:j + 1], out["prev_score"][j:j + 1]
            obj.template = out["template"][j:j + 1] if self.has_gate else None
        return objects, features

    def _update(self, computed: list[tuple[_Object, np.ndarray]]) -> None:
        """After a frame: each computed object with enough foreground in its kept soft mask (H, W)
        stores its last sample in its memory; every `train_skipping`-th application the objects
        due re-optimize their filters together."""
        if not computed:
            return
        objs = [o for o, _ in computed]
        out = self.run("memory_encode", soft_masks=np.stack([m for _, m in computed])[:, None],
                       scores=_cat(o.prev_score for o in objs))
        chosen = [j for j, enough in enumerate(out["enough"]) if enough]
        for j in chosen:
            obj = objs[j]
            slot = next_slot(obj.weights, obj.last_slot, self.learning_rate)
            obj.size, obj.last_slot = min(obj.size + 1, self.memory_size), slot
            obj.samples[slot], obj.metrics[slot], obj.targets[slot] = obj.current, out["metrics"][j], out["targets"][j]
        due = [objs[j] for j in chosen if objs[j].applications % self.train_skipping == 0]
        if due:
            slots = max(o.size for o in due)
            out = self.run("optimize_filters", samples=_stack(o.samples[:slots] for o in due),
                           metrics=_stack(o.metrics[:slots] for o in due), targets=_stack(o.targets[:slots] for o in due),
                           weights=_stack(o.weights[:slots] for o in due),
                           filters=_stack(o.filters.reshape(-1) for o in due), direction=_stack(o.direction for o in due),
                           rho=_stack(o.rho for o in due), residual=_stack(o.residual for o in due))
            for j, obj in enumerate(due):
                obj.filters = out["new_filters"][j].reshape(obj.filters.shape)
                obj.direction, obj.rho, obj.residual = out["new_direction"][j], out["new_rho"][j], out["new_residual"][j]


def _cat(arrays) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(list(arrays)))


def _stack(arrays) -> np.ndarray:
    return np.ascontiguousarray(np.stack(list(arrays)))
