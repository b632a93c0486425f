"""Host bookkeeping of a target model's sample memory (FRTM), in numpy: which slot a new sample
takes and the sample weights. Shared by the PyTorch tracker (`models.target_model`) and the
runtime without PyTorch (`deploy`), so both choose the same slots.

A memory has S slots; the K first samples weigh 2/K (the frame itself) and 1/K (its
augmentations), normalized; a new sample replaces the lowest-weight slot (the first empty one
while there is one) and gets its weight from the learning rate.
"""
from __future__ import annotations

import numpy as np


def first_sample_weights(k: int) -> np.ndarray:
    """Host weights (K,) float32 of a memory's K first samples (FRTM): 2/K for the first, 1/K
    for the others, normalized."""
    w = np.full(k, 1.0 / k, np.float32)
    w[0] = 2.0 / k
    return w / w.sum()


def next_slot(weights: np.ndarray, last_slot: int, learning_rate: float) -> int:
    """The slot (S,) `weights` (float32, one memory's, updated in place and renormalized) gives
    a new sample; `last_slot`: the slot of the previous insert, -1 before any."""
    lr = learning_rate
    if lr == 1:
        weights[:] = 0
        slot = 0
        weights[0] = 1
    else:
        slot = int(np.argmin(weights))  # the first minimum: the first empty slot while there is one
        if last_slot < 0:
            weights /= 1 - lr
            weights[slot] = lr
        else:
            # As upstream: the new weight derives from the previous insert's weight and the
            # old weights are not decayed again before renormalizing.
            weights[slot] = weights[last_slot] / (1 - lr)
    weights /= weights.sum()
    return slot
