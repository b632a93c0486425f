"""The DAVIS colour palette and reading/writing of label PNGs and JPEG frames.

Label maps are palette ("P" mode) PNGs whose pixel values are object ids (0 = background).
The palette is the one in the DAVIS annotations, i.e. the PASCAL VOC colour map.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def _voc_colour_map(n: int = 256) -> np.ndarray:
    """PASCAL VOC colour map: the bits of the index are spread over the top bits of R, G, B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        cmap[index] = (r, g, b)
    return cmap


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

DAVIS_PALETTE: np.ndarray = _voc_colour_map(256)
"""256 x 3 uint8: RGB colour of each label id (0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...)."""


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as its raw pixel values (palette indices): uint8 array H x W.

    Raises FileNotFoundError if the file is missing, ValueError if it cannot be decoded or is
    not a single-channel (palette or grey) image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label PNG not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            labels = np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode label PNG {path}: {exc}") from exc
    if mode not in ("P", "L") or labels.ndim != 2:
        raise ValueError(f"label PNG {path} has mode {mode!r}, expected a palette ('P') or "
                         f"grey ('L') image with object ids as pixel values")
    return labels.astype(np.uint8, copy=False)


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write labels (uint8 H x W, object ids) as a DAVIS-palette PNG, atomically.

    The image goes to a temporary file in the same directory, then os.replace()s the target,
    so a reader never sees a half-written file. The parent directory must exist.
    """
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            # load() decodes the whole file, so a truncated JPEG fails here, not later.
            im.load()
            rgb = im.convert("RGB")
            image = np.array(rgb)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {path} (corrupt or truncated file?): {exc}") from exc
    return image


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path atomically: temporary file in the same directory, then os.replace()."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
