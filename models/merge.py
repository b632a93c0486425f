"""FRTM's merge of object probabilities into labels (a per-frame region: models.regions)."""
from __future__ import annotations

import torch


def _max_over_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax (first wins ties) over the rows (dim -3) of a short (..., R, H, W) stack;
    much faster on CPU than a strided reduction when R is small."""
    best = x[..., 0, :, :].clone()
    index = torch.zeros(best.shape, dtype=torch.long, device=x.device)
    for i in range(1, x.shape[-3]):
        row = x[..., i, :, :]
        index.masked_fill_(row > best, i)
        torch.maximum(best, row, out=best)
    return best, index


def merge_probabilities(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FRTM's merge. p (1 + N, H, W), or (F, 1 + N, H, W) for F frames at once: row 0 ignored
    (background), rows 1.. object probabilities.

    Clamp to [1e-7, 1 - 1e-7], background = min over objects of (1 - p), softmax of p / (1 - p)
    over the rows. Returns the kept soft masks (each row's softmax value where it wins, else 0),
    p's shape, and the winning row per pixel (..., H, W).
    """
    p = p.clamp(1e-7, 1 - 1e-7)
    p[..., 0, :, :] = 1 - _max_over_rows(p[..., 1:, :, :])[0]  # = min over objects of (1 - p), exactly
    odds = p / (1 - p)
    top, _ = _max_over_rows(odds)
    e = torch.exp(odds - top.unsqueeze(-3))
    segs = e / e.sum(dim=-3, keepdim=True)
    _, winner = _max_over_rows(segs)
    rows = torch.arange(segs.shape[-3], device=segs.device).view(-1, 1, 1)
    return segs * (winner.unsqueeze(-3) == rows), winner


def labels_from_merge(soft: torch.Tensor, winner: torch.Tensor) -> torch.Tensor:
    """Label rows (..., H, W) as upstream computes them: it merges the kept soft masks once more,
    which keeps an object's pixel only where its kept value exceeds 0.5 (else background)."""
    kept = soft.gather(-3, winner.unsqueeze(-3)).squeeze(-3)
    return torch.where((winner > 0) & (kept.clamp(max=1 - 1e-7) > 0.5), winner, torch.zeros_like(winner))
