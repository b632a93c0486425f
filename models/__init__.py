"""G-FRTM (Reuse-VOS) models. Entry point for users embedding the tracker:

    from models import build_tracker
    tracker = build_tracker("weights/gfrtm_rn18.pth", device="cuda:0")
    result = tracker.run_sequence(frames, threshold=0.7)
"""
from __future__ import annotations

import torch

from .backbone import Backbone, BackboneWeights
from .checkpoint import CheckpointSource, build_network, save_checkpoint
from .network import GFRTM
from .target_model import TargetModel, TargetModelConfig
from .tracker import FrameResult, SequenceResult, Tracker

__all__ = ["build_tracker", "Backbone", "GFRTM", "TargetModel", "TargetModelConfig", "Tracker",
           "FrameResult", "SequenceResult", "save_checkpoint"]


def build_tracker(checkpoint: CheckpointSource, device: str | torch.device = "cpu", fast: bool = True,
                  num_aug: int = 5, backbone_weights: BackboneWeights = "imagenet", ftext: str | None = None,
                  batch_objects: bool = True, seed: int = 0, precision: str = "fp32",
                  compile: bool | str = False) -> Tracker:
    """A tracker for a released G-FRTM / FRTM checkpoint or one of ours.

    checkpoint: path or loaded dict; the backbone (resnet18 / resnet101) follows from it and must
    agree with `ftext` when given. backbone_weights: "imagenet" (torchvision weights API, cached),
    a path to a torchvision ResNet state dict, a state dict, or None / "random" (random weights,
    seeded by `seed`: tests only). fast: upstream's fewer target-model optimizer steps (upstream
    always evaluated with fast). num_aug: first-frame augmentations for the target model (1 = none).
    precision: "fp32" (default), "bf16" or "fp16": the backbone and the network under autocast,
    the target models and the merge of object probabilities in fp32; a ValueError says what to
    use instead where the device cannot run it (fp16 on most CPUs, bf16 on older GPUs).
    compile: torch.compile the per-frame regions with inductor (True) or the torch.compile backend
    named (e.g. "aot_eager", which checks that they compile without generating code); models.compiled.
    """
    network, _ = build_network(checkpoint, expected_backbone=ftext)
    backbone = Backbone(network.backbone_name, backbone_weights, seed=seed)
    augmenter = None
    if num_aug > 1:
        from .augmenter import FirstFrameAugmenter, evaluation_params
        augmenter = FirstFrameAugmenter(evaluation_params(num_aug))
    return Tracker(network, backbone, TargetModelConfig.evaluation(fast), augmenter, device,
                   batch_objects=batch_objects, seed=seed, precision=precision, compile=compile)
