"""Reading and writing frames and label maps, and resizing them.

Label maps are palette ("P" mode) PNGs whose pixel values are object ids (0 = background),
written with the DAVIS palette (lib.palette) through the atomic writer (lib.fileio). Frames are
read as uint8 RGB H x W x 3.

Resizing: the interpolation is in each function's name; each has its users, which must not mix
them (results differ by a pixel at object borders):
* `resize_image_bilinear`, `resize_labels_nearest`: training samples, as upstream;
* `resize_image_area`, `resize_labels_nearest_exact`: tracking your own video and drawing
  overlays (pixel centres aligned).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from lib.errors import UsageError
from lib.fileio import atomic_write_bytes
from lib.palette import DAVIS_PALETTE


def _decode(path: str | os.PathLike, what: str, rgb: bool, hint: str = "") -> tuple[str, np.ndarray]:
    """(PIL mode of the file, pixels, converted to RGB if `rgb`) of an image file, fully decoded
    (a truncated file fails here). FileNotFoundError if missing, ValueError if undecodable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.mode, np.array(im.convert("RGB") if rgb else im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UsageError(f"cannot decode {what} {path}{hint}: {exc}") from exc


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as its raw pixel values (palette indices): uint8 array H x W.

    Raises FileNotFoundError if the file is missing, ValueError if it cannot be decoded or is
    not a single-channel (palette or grey) image.
    """
    mode, labels = _decode(path, "label PNG", rgb=False)
    if mode not in ("P", "L") or labels.ndim != 2:
        raise UsageError(f"label PNG {path} has mode {mode!r}, expected a palette ('P') or "
                         f"grey ('L') image with object ids as pixel values")
    return labels.astype(np.uint8, copy=False)


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write labels (uint8 H x W, object ids) as a DAVIS-palette PNG, atomically.
    The parent directory must exist."""
    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels for {path} must be H x W, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"labels for {path} must lie in 0..255")
        labels = labels.astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(labels))  # mode "L"; putpalette makes it "P"
    image.putpalette(DAVIS_PALETTE.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file (JPEG frame) as uint8 RGB array H x W x 3.

    Raises FileNotFoundError if missing, ValueError if the file is corrupt or truncated.
    """
    return _decode(path, "image", rgb=True, hint=" (corrupt or truncated file?)")[1]


def resize_image_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an RGB uint8 H x W x 3 frame to size (h, w) (training samples).
    Upstream meant INTER_AREA / INTER_CUBIC but passed them as cv2.resize's `dst` argument, so
    it resized bilinearly; so do we."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def resize_image_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 H x W x 3 to size (h, w) with cv2.INTER_AREA when shrinking (INTER_LINEAR when
    enlarging, where area averaging is undefined): frames of your own video."""
    if image.shape[:2] == tuple(size):
        return image
    shrink = size[0] <= image.shape[0] and size[1] <= image.shape[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_labels_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Label map uint8 H x W to size (h, w) with torch's 'nearest' (source index floor(i * H / h)),
    as upstream's training; used for training visibility and samples alike."""
    if labels.shape == tuple(size):
        return labels
    import torch  # here: the module is imported without PyTorch by the exported runtime (deploy/)
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(labels)).float()[None, None]
    return F.interpolate(t, size, mode="nearest")[0, 0].to(torch.uint8).numpy()


def resize_labels_nearest_exact(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Label map uint8 H x W to size (h, w), nearest neighbour with pixel centres aligned
    (cv2.INTER_NEAREST_EXACT): masks of your own video and of overlays."""
    if labels.shape[:2] == tuple(size):
        return labels
    return cv2.resize(np.ascontiguousarray(labels), (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def host_image(image) -> np.ndarray:
    """A tracker's input frame as a contiguous (H, W, 3) uint8 array. A numpy array is taken as
    (H, W, 3); anything else (a CPU tensor: the trackers also take those) as (3, H, W)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image array, got shape {image.shape}")
        return np.ascontiguousarray(image)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {image.shape}")
    return np.ascontiguousarray(image.transpose(1, 2, 0))
