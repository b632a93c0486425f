"""Disk cache of the target models used in training (frozen during training, as upstream).

Keyed as upstream, so upstream's released cache can be used as is:
`<root>/<backbone>-c32_gTrue/<sequence>/<reference frame index %05d>.<object id>.layer4.pth`
holding the target model's state dict (`project.weight`, `filter.weight`).
Missing entries are trained (first-frame augmentation with `num_aug` images,
`TargetModelConfig.training()`) and written atomically, so concurrent processes and kills never
leave a partial entry; unreadable or mismatching entries are retrained with a warning.
The last `memory_size` entries used stay in memory (LRU), so a sample drawn again soon is not
read from disk again. The trainer fills the cache for an epoch's samples before the epoch
(`Trainer.fill_cache`), so the batch loop only reads.
"""
from __future__ import annotations

import logging
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lib.errors import OutputError
from lib.fileio import make_dirs
from lib.safe_load import load_pth
from models.augmenter import FirstFrameAugmenter, training_params
from models.backbone import Backbone
from lib.fileio import atomic_save
from models.target_model import TargetModel, TargetModelConfig

log = logging.getLogger(__name__)
LAYER = "layer4"
TMCACHE_FLAG = "--tmcache or $RVOS_TMCACHE"  # what places the cache, named when it cannot be made


def writable_cache(folder: Path) -> bool:
    """Whether cache entries can be written in `folder`, made here if missing. An existing folder
    this user cannot write (e.g. upstream's released cache on a read-only disk) is read as it is
    (False, said once); any other unusable path raises OutputError naming --tmcache."""
    folder = Path(folder)
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        log.warning("the target-model cache %s is read-only: its entries are used, new ones are not saved", folder)
        return False
    make_dirs(folder, "the target-model cache", TMCACHE_FLAG)
    return True


class TargetModelCache:
    def __init__(self, root: Path, backbone: Backbone, device: torch.device, num_aug: int = 15,
                 read_only: bool = False, seed: int = 0, memory_size: int = 128):
        self.config = TargetModelConfig.training()
        self.path = Path(root) / f"{backbone.name}-c{self.config.channels}_gTrue"
        self.backbone = backbone
        self.device = torch.device(device)
        self.augmenter = FirstFrameAugmenter(training_params(num_aug)) if num_aug > 1 else None
        self.read_only = read_only or not writable_cache(self.path)
        self.seed = seed
        self.memory_size = memory_size
        self._memory: OrderedDict[tuple[str, int, int], TargetModel] = OrderedDict()  # LRU, newest last
        self.hits = 0  # entries found in memory or read from disk
        self.misses = 0  # entries trained (missing or unreadable)

    def file(self, sequence: str, first_frame: int, object_id: int) -> Path:
        return self.path / sequence / f"{first_frame:05d}.{object_id}.{LAYER}.pth"

    def get(self, sequence: str, first_frame: int, object_id: int, image: torch.Tensor,
            mask: torch.Tensor) -> TargetModel:
        """The target model of an object from its reference frame: image (3, H, W) 0..255,
        mask (1, H, W) 0/1, both on the training device."""
        key = (sequence, first_frame, object_id)
        model = self._memory.get(key)
        if model is not None:
            self._memory.move_to_end(key)
            self.hits += 1
            return model
        model = self._read(key)
        if model is not None:
            self.hits += 1
        else:
            self.misses += 1
            model = self._train(key, image, mask)
            self._write(key, model)
        self._remember(key, model)
        return model

    def has(self, sequence: str, first_frame: int, object_id: int) -> bool:
        """Whether an entry is in memory or on disk (not checked for being readable)."""
        key = (sequence, first_frame, object_id)
        return key in self._memory or self.file(*key).is_file()

    def _new_model(self) -> TargetModel:
        return TargetModel(self.backbone.channels[LAYER], self.config, self.device, seed=self.seed)

    def _read(self, key: tuple[str, int, int]) -> TargetModel | None:
        path = self.file(*key)
        if not path.is_file():
            return None
        model = self._new_model()
        try:
            model.load_trained(load_pth(path, map_location=self.device))
            return model
        except Exception as exc:  # truncated, foreign or mismatching file: retrain it
            log.warning("unreadable target-model cache entry %s (%s): retraining it", path, exc)
            return None

    def _write(self, key: tuple[str, int, int], model: TargetModel) -> None:
        if self.read_only:
            return
        path = self.file(*key)
        try:
            atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        except OutputError as exc:
            log.warning("could not write target-model cache entry %s (%s)", path, exc)

    def _remember(self, key: tuple[str, int, int], model: TargetModel) -> None:
        self._memory[key] = model
        while len(self._memory) > self.memory_size:
            self._memory.popitem(last=False)

    def _train(self, key: tuple[str, int, int], image: torch.Tensor, mask: torch.Tensor) -> TargetModel:
        """A target model trained on the reference frame (3, H, W) and mask (1, H, W) of `key`."""
        sequence, first_frame, object_id = key
        if mask.sum() == 0:
            raise ValueError(f"{sequence}: object {object_id} is empty in reference frame {first_frame}")
        images, masks = image[None].float(), (mask[None] > 0).float()
        if self.augmenter is not None:
            rng = np.random.default_rng([self.seed, zlib.crc32(sequence.encode()), first_frame, object_id])
            try:
                images, masks = self.augmenter.augment(image, mask, rng)
            except (RuntimeError, ValueError) as exc:  # e.g. an object too small to cut out and paste
                log.warning("%s: could not augment object %d of frame %d (%s); its target model is trained on "
                            "the frame alone", sequence, object_id, first_frame, exc)
        with torch.no_grad():
            features = torch.cat([self.backbone(chunk)[LAYER] for chunk in images.split(4)])
        model = self._new_model()
        model.initialize(features, masks)
        return model

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")
