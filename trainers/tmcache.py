"""Disk cache of the target models used in training (frozen during training, as upstream).

Keyed as upstream, so upstream's released cache can be used as is:
`<cache>/<backbone>-c32_gTrue/<sequence>/<first frame index %05d>.<object>.layer4.pth`.
Missing entries are trained (first-frame augmentation, `TargetModelConfig.training()`) and
written atomically; unreadable ones are retrained with a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from models.augmenter import FirstFrameAugmenter, training_params
from models.backbone import Backbone
from models.checkpoint import atomic_save
from models.target_model import TargetModel, TargetModelConfig

log = logging.getLogger(__name__)
LAYER = "layer4"


class TargetModelCache:
    def __init__(self, root: Path, backbone: Backbone, device: torch.device, num_aug: int = 15,
                 read_only: bool = False, seed: int = 0):
        self.config = TargetModelConfig.training()
        self.path = Path(root) / f"{backbone.name}-c{self.config.channels}_gTrue"
        self.backbone = backbone
        self.device = device
        self.augmenter = FirstFrameAugmenter(training_params(num_aug)) if num_aug > 1 else None
        self.read_only = read_only
        self.seed = seed
        self.hits = 0
        self.misses = 0

    def file(self, sequence: str, first_frame: int, object_id: int) -> Path:
        return self.path / sequence / f"{first_frame:05d}.{object_id}.{LAYER}.pth"

    def get(self, sequence: str, first_frame: int, object_id: int, image: torch.Tensor,
            mask: torch.Tensor) -> TargetModel:
        """The target model of an object from its reference frame: image (3, H, W) 0..255,
        mask (1, H, W) 0/1, both on the training device."""
        path = self.file(sequence, first_frame, object_id)
        model = TargetModel(self.backbone.channels["layer4"], self.config, self.device, seed=self.seed)
        if path.is_file():
            try:
                model.load_trained(torch.load(path, map_location=self.device, weights_only=True))
                self.hits += 1
                return model
            except Exception as exc:  # truncated or foreign file: retrain it
                log.warning("unreadable target-model cache entry %s (%s): retraining", path, exc)
        self.misses += 1
        if self.augmenter is not None:
            rng = np.random.default_rng([self.seed, first_frame, object_id])
            images, masks = self.augmenter.augment(image, mask, rng)
        else:
            images, masks = image[None].float(), mask[None].float()
        with torch.no_grad():
            features = torch.cat([self.backbone(chunk)[LAYER] for chunk in images.split(4)])
        model.initialize(features, masks)
        if not self.read_only:
            atomic_save({k: v.cpu() for k, v in model.state_dict().items()}, path)
        return model

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")
