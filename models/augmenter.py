"""The first-frame augmentation (`lib.augmentation`, numpy and OpenCV) on the tracker's tensors:
images and masks come from and go back to the input's device."""
from __future__ import annotations

import numpy as np
import torch

from lib.augmentation import (AugmentationParams, HostAugmenter, TransformChoices, _blur,  # noqa: F401 (re-exported)
                              _motion_blur_kernel, evaluation_params, training_params)


class FirstFrameAugmenter(HostAugmenter):
    """`HostAugmenter` taking and returning tensors."""

    def augment(self, image: torch.Tensor, mask: torch.Tensor,
                rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image: uint8 (or float 0..255) (3, H, W) on any device; mask: (1, H, W) or (H, W), 0/1.

        Returns images (K, 3, H, W) float 0..255 and masks (K, 1, H, W) float 0/1 on the input's
        device, K = num_aug; index 0 is the input unchanged (the mask binarized as mask > 0).
        All randomness comes from `rng` (default: a fresh np.random.default_rng(0) per call).
        Raises ValueError for an empty mask or one below min_px_count, RuntimeError when
        max_rounds of drawing do not yield num_aug - 1 frames that keep the object.
        """
        augmented, masks = self.augmented_frames(image, mask, rng)
        return torch.cat([image.float().unsqueeze(0), augmented.float()]), masks

    def augmented_frames(self, image: torch.Tensor, mask: torch.Tensor,
                         rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `augment`, but without repeating the input image, for a caller that already has it
        (the tracker puts the frame once in the backbone batch): uint8 images (K - 1, 3, H, W) of
        the augmented frames only, and float masks (K, 1, H, W), the input's first; both on the
        input's device. Built on the host (`host_frames`), so they cost the device one copy each."""
        images, masks = self.host_frames(*self._host_inputs(image, mask), rng)
        device = image.device
        return torch.from_numpy(images).permute(0, 3, 1, 2).to(device), torch.from_numpy(masks).to(device)

    def prepare(self, image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator | None = None) -> None:
        """`prepare_host` for tensors: `augmented_frames(image, mask, rng)` computed ahead."""
        try:
            image_np, mask_np = self._host_inputs(image, mask)
        except ValueError:
            return
        self.prepare_host(image_np, mask_np, rng)

    def _host_inputs(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray]:
        """The inputs on the host: image (H, W, 3) uint8 (None when num_aug is 1: not needed)
        and mask (H, W)."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be 3xHxW, got shape {tuple(image.shape)}")
        mask = mask.reshape(-1, *mask.shape[-2:])
        if mask.shape[0] != 1 or mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match image {tuple(image.shape)}")
        mask_np = mask[0].detach().cpu().numpy()
        if self.params.num_aug == 1:
            return None, mask_np
        image_np = image.detach()
        if image_np.dtype != torch.uint8:
            image_np = image_np.float().round().clamp(0, 255).to(torch.uint8)
        return image_np.cpu().permute(1, 2, 0).numpy(), mask_np
