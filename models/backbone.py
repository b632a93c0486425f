"""Frozen torchvision ResNet backbone split into a low part (every frame) and a high part
(once per frame, only when some object computes) (FRTM, Robinson et al., CVPR 2020)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lib.errors import UsageError
from lib.safe_load import load_pth

from .network import BACKBONE_CHANNELS

BackboneWeights = Union[str, os.PathLike, Mapping[str, torch.Tensor], None]

_TORCHVISION = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_state_dict(name: str) -> dict:
    """ImageNet weights through torchvision's weights API (cached under torch.hub's dir)."""
    weights = _TORCHVISION[name][1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # offline, proxy, partial download...
        raise FileNotFoundError(
            f"ImageNet weights for {name} are not cached at {cached} and could not be downloaded ({e}). "
            f"Download {weights.url} on a machine with internet and either copy it to {cached} or pass "
            f"its path with --backbone-weights PATH (Python: backbone_weights=PATH). "
            f"Use --backbone-weights random only for tests: results are meaningless without ImageNet weights."
        ) from e


def load_backbone_state_dict(name: str, weights: BackboneWeights, seed: int | None = None) -> dict | None:
    """Resolve `weights` ("imagenet", "random"/"none"/None, a path, or a state dict) to a state dict,
    or None for random initialization (seeded by `seed` when given)."""
    if isinstance(weights, Mapping):
        return dict(weights)
    if weights is None or (isinstance(weights, str) and weights.lower() in ("random", "none")):
        if seed is None:
            return None
        gen_state = torch.random.get_rng_state()
        try:  # seeded without disturbing the caller's global RNG
            torch.manual_seed(seed)
            return _TORCHVISION[name][0](weights=None).state_dict()
        finally:
            torch.random.set_rng_state(gen_state)
    if isinstance(weights, str) and weights.lower() == "imagenet":
        return _imagenet_state_dict(name)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist (--backbone-weights)")
    state = load_pth(path, what="backbone weights file")
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    return dict(state)


class Backbone(nn.Module):
    """ResNet feature extractor, frozen and in eval mode.

    low(image)  -> layer1 (stride 4, after maxpool), layer2 (after resnet.layer1, stride 4),
                   layer3 (after resnet.layer2, stride 8)
    high(layer3) -> layer4 (stride 16), layer5 (stride 32)
    Images are (B, 3, H, W) RGB in 0..255 (uint8 or float).
    """

    def __init__(self, name: str = "resnet18", weights: BackboneWeights = "imagenet", seed: int | None = None):
        super().__init__()
        if name not in _TORCHVISION:
            raise UsageError(f"unknown backbone {name!r}: use resnet18 or resnet101 (--ftext)")
        self.name = name
        self.channels = BACKBONE_CHANNELS[name]  # per level, layer1 .. layer5
        with torch.random.fork_rng(devices=[]):  # its random init is replaced: leave the global RNG alone
            self.resnet = _TORCHVISION[name][0](weights=None)
        state = load_backbone_state_dict(name, weights, seed)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = self.resnet.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise UsageError(f"backbone weights do not fit {name}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]} (check --backbone-weights / --ftext)")
        del self.resnet.fc, self.resnet.avgpool
        for p in self.resnet.parameters():
            p.requires_grad_(False)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("norm_scale", 1 / 255 / std, persistent=False)
        self.register_buffer("norm_shift", -mean / std, persistent=False)
        self.channels_last = False  # set by use_channels_last()
        self.eval()

    def fuse_batch_norm(self) -> "Backbone":
        """Fold every (frozen, eval-mode) batch norm into the conv before it: same features up to
        rounding, about 10% faster. Irreversible; for inference."""
        r = self.resnet
        r.conv1, r.bn1 = fuse_conv_bn_eval(r.conv1, r.bn1), nn.Identity()
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            for block in layer:
                for i in (1, 2, 3):
                    if hasattr(block, f"bn{i}"):
                        setattr(block, f"conv{i}", fuse_conv_bn_eval(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")))
                        setattr(block, f"bn{i}", nn.Identity())
                if block.downsample is not None:
                    block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
        for p in self.resnet.parameters():
            p.requires_grad_(False)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def use_channels_last(self) -> "Backbone":
        """Run in channels-last memory format (faster convolutions on CPU and with cuDNN)."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(False)  # always frozen, batch norm in eval mode

    def low(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) 0..255 -> {layer1, layer2, layer3}."""
        r = self.resnet
        x = self.norm_scale * image.float() + self.norm_shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        layer1 = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        layer2 = r.layer1(layer1)
        layer3 = r.layer2(layer2)
        return {"layer1": layer1, "layer2": layer2, "layer3": layer3}

    def high(self, layer3: torch.Tensor) -> dict[str, torch.Tensor]:
        """layer3 -> {layer4, layer5}."""
        layer4 = self.resnet.layer3(layer3)
        return {"layer4": layer4, "layer5": self.resnet.layer4(layer4)}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """All five levels."""
        features = self.low(image)
        features.update(self.high(features["layer3"]))
        return features
