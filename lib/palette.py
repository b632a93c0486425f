"""The DAVIS colour palette: label PNGs are written with it and overlays drawn in it.

It is the palette of the DAVIS annotations, i.e. the PASCAL VOC colour map.
"""
from __future__ import annotations

import numpy as np


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


DAVIS_PALETTE: np.ndarray = _voc_colour_map(256)
"""256 x 3 uint8: RGB colour of each label id (0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...)."""
