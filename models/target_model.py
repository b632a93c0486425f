"""FRTM's target model: a per-object 2-layer conv optimized online by Gauss-Newton with
conjugate-gradient inner loops on a weighted least-squares loss (FRTM, Robinson et al., CVPR 2020).

The tracker keeps its objects' target models as the rows of a `TargetModelTable` (fixed-capacity
memories; scores, inserts and re-optimisations batched over objects, each row's numbers the
same as alone); `TargetModel` is one of them as a module (what training caches).

Shapes: K samples, C_in = layer4 channels, c = projection channels, (h, w) the stride-16
feature size, (H, W) the label (image) size.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.precision import full_fp32, to_device


@dataclass(frozen=True)
class TargetModelConfig:
    """Target-model settings; `evaluation()` and `training()` give the two upstream sets."""

    channels: int = 96
    init_iters: tuple[int, ...] = (5, 10, 10, 10)
    update_iters: tuple[int, ...] = (5,)
    memory_size: int = 80
    train_skipping: int = 8
    learning_rate: float = 0.1
    filter_reg: tuple[float, float] = (1e-4, 1e-2)
    precond: tuple[float, float] = (1e-4, 1e-2)
    precond_lr: float = 0.1
    cg_forgetting_rate: float = 750
    pixel_weighting: str = "hinge"  # "hinge" or "none"
    target_fraction: float = 0.1  # hinge: the foreground carries at least this fraction of the loss
    min_update_pixels: int = 10  # an update needs this many pixels above 0.5

    @classmethod
    def evaluation(cls, fast: bool = True) -> "TargetModelConfig":
        """Upstream evaluation settings; upstream always ran `fast`."""
        if fast:
            return cls()
        return cls(init_iters=(5, 10, 10, 10, 10), update_iters=(10,))

    @classmethod
    def training(cls) -> "TargetModelConfig":
        """Settings of the target models cached for training (c = 32)."""
        return cls(channels=32, init_iters=(5, 10, 10, 10, 10), update_iters=(10,), memory_size=20,
                   filter_reg=(1e-5, 1e-4), precond=(1e-5, 1e-4), cg_forgetting_rate=75, pixel_weighting="none")

    def enough_foreground(self, soft_masks: torch.Tensor) -> torch.Tensor:
        """Whether each soft mask (N, 1, H, W) has the `min_update_pixels` above 0.5 an update
        needs -> bool (N,), on the masks' device (the caller fetches all objects' at once)."""
        return (soft_masks > 0.5).flatten(1).sum(1) >= self.min_update_pixels


def pixel_weights(labels: torch.Tensor, method: str = "hinge", target_fraction: float = 0.1) -> torch.Tensor:
    """Square roots of the per-pixel loss weights, (N, 1, H, W) for labels (N, 1, H, W).

    'hinge' up-weights the foreground of small objects so that it carries at least
    `target_fraction` of the loss; objects already that large (or under 10 pixels) keep weight 1.
    """
    if method == "none":
        return torch.ones_like(labels, dtype=torch.float32)
    if method != "hinge":
        raise ValueError(f"unknown pixel weighting {method!r}: use 'hinge' or 'none'")
    n, c, h, w = labels.shape
    y = labels.float()
    count = y.sum(dim=(2, 3)).view(n, c, 1, 1)
    fraction = (count / (h * w)).masked_fill(count < 10, target_fraction)  # tiny objects count as tf
    tf = fraction.clamp(min=target_fraction)  # the foreground's share of the loss
    weight_fg = tf / fraction
    weight_bg = (1 - tf) / (1 - fraction)
    return torch.sqrt(torch.lerp(weight_bg, weight_fg, y))  # exactly weight_fg or weight_bg for 0/1 labels


class UpsamplingMetric:
    """The data term of the target-model loss, moved to the score resolution.

    Upstream's residual is r = w ⊙ (U s − y): U bilinearly upsamples the stride-16 score s
    (h, w) to the label size (H, W), w are pixel weights. Gauss-Newton only needs
        ‖r‖² = sᵀ M s − 2 sᵀ g + const,  M = Uᵀ diag(w²) U,  g = Uᵀ (w² ⊙ y).
    U is separable (U_h ⊗ U_w) and bilinear, so M couples each score pixel with its 3x3
    neighbours only: it is stored as 9 maps of size (h, w). The same optimizer then runs on
    (h, w) maps instead of (H, W) images: identical mathematics, far less work and memory.
    """

    def __init__(self, score_size, label_size, device):
        h, w = score_size
        H, W = label_size
        self.score_size = (h, w)
        self.uh = self._upsampling_matrix(h, H, device)  # (H, h)
        self.uw = self._upsampling_matrix(w, W, device)  # (W, w)
        # products of neighbouring columns: P[d][Y, a] = U[Y, a] U[Y, a + d - 1] (0 outside)
        self.ph = self._neighbour_products(self.uh)  # (3, H, h)
        self.pw = self._neighbour_products(self.uw)  # (3, W, w)
        self.pw_columns = self.pw.permute(1, 0, 2).reshape(self.pw.shape[1], -1)  # (W, 3 w): one GEMM for all dx

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def cached(score_size: tuple[int, int], label_size: tuple[int, int], device: torch.device) -> "UpsamplingMetric":
        """One shared instance per sizes and device (it is only read): object starts on frames
        of the same size skip building the matrices."""
        return UpsamplingMetric(score_size, label_size, device)

    @staticmethod
    def _upsampling_matrix(n: int, size: int, device) -> torch.Tensor:
        """(size, n): the weights F.interpolate(bilinear, align_corners=False) uses along one axis."""
        eye = torch.eye(n, device=device).view(1, 1, n, n)
        return F.interpolate(eye, (size, n), mode="bilinear", align_corners=False)[0, 0]

    @staticmethod
    def _neighbour_products(m: torch.Tensor) -> torch.Tensor:
        """(3, size, n): out[d][:, a] = m[:, a] m[:, a + d - 1], zero where a + d - 1 is out of range."""
        n = m.shape[1]
        padded = F.pad(m, (1, 1))
        return m * torch.stack([padded[:, d:d + n] for d in range(3)])

    def metric(self, weights: torch.Tensor) -> torch.Tensor:
        """Squared pixel weights (N, 1, H, W) -> M as 9 neighbour maps (N, 9, h, w)."""
        n, _, H, W = weights.shape
        t = (weights.reshape(n * H, W) @ self.pw_columns).view(n, H, 3, -1).transpose(1, 2)  # (N, 3 dx, H, w)
        m = torch.matmul(self.ph.transpose(1, 2).unsqueeze(0).unsqueeze(2), t.unsqueeze(1))  # (N, 3 dy, 3 dx, h, w)
        return m.flatten(1, 2)

    def encode(self, labels: torch.Tensor, pixel_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and pixel weights (N, 1, H, W) -> samples as the memory keeps them: (metrics
        M (N, 9, h, w), targets g = Uᵀ(w² ⊙ y) (N, 1, h, w))."""
        squared = pixel_weights * pixel_weights
        return self.metric(squared), self.adjoint(squared * labels.float())

    def adjoint(self, image: torch.Tensor) -> torch.Tensor:
        """Uᵀ applied to (N, 1, H, W) -> (N, 1, h, w)."""
        return torch.matmul(torch.matmul(self.uh.t(), image[:, 0]), self.uw).unsqueeze(1)

    @staticmethod
    def apply(metric: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """M v for v (N, 1, h, w) and M (N, 9, h, w): map k weighs v shifted by (k // 3 − 1,
        k % 3 − 1), which is row k of unfold(v): 3 ops. (The reduction rounds otherwise than a
        term-by-term sum; it lands closer to upstream's full-resolution loss on every golden
        tracker vector.)"""
        n, _, h, w = v.shape
        return (metric.flatten(2) * F.unfold(v, 3, padding=1)).sum(1).view(n, 1, h, w)


def first_sample_weights(k: int) -> np.ndarray:
    """Host weights (K,) float32 of a memory's K first samples (FRTM): 2/K for the first, 1/K
    for the others, normalized."""
    w = np.full(k, 1.0 / k, np.float32)
    w[0] = 2.0 / k
    return w / w.sum()


def fold_taps(taps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """S*: each pixel's 9 tap values (B, h w, 9) -> scores (B, 1, h, w). Tap k of a pixel lands
    at offset (k // 3 − 1, k % 3 − 1) and the taps landing on a pixel are summed (`F.fold`)."""
    return F.fold(taps.transpose(1, 2), size, 3, padding=1)


def filter_taps(filter_weight: torch.Tensor) -> torch.Tensor:
    """3x3 filter weights to one channel, (N, c, 9) (a (1, c, 3, 3) convolution weight per row,
    flattened) -> the matrix (N, c, 9) whose column k is tap 8 − k: a pixel's row times it gives
    the values `fold_taps` moves to offset (k // 3 − 1, k % 3 − 1), i.e. the convolution."""
    return filter_weight.flip(2)


def target_scores(pixels: torch.Tensor, project: torch.Tensor, filter_weight: torch.Tensor,
                  size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """N target models applied: pixels (N, h w, C) fp32 layer4 features, channels last (a batch
    of 1 serves all N), projections (N, c, C), filter weights (N, c, 9) -> (projected pixels
    Z (N, h w, c), scores (N, 1, h, w)). Batched matmuls and a fold: the same function as a 1x1
    convolution followed by a 3x3 one to one channel (padding 1), much faster than oneDNN's
    one-channel convolution."""
    if pixels.shape[0] != project.shape[0]:
        pixels = pixels.expand(project.shape[0], -1, -1)
    z = torch.bmm(pixels, project.transpose(1, 2))
    return z, fold_taps(torch.bmm(z, filter_taps(filter_weight)), size)


class FilterProblem:
    """The update problem of N target models (rows) at once: weighted least squares over each
    row's memory, ‖sqrt(sample weight) · w ⊙ (resize(filter(z), label size) − y)‖² + ‖reg · θ‖²,
    over the filter weights θ (c, 3, 3) (flattened to (N, 9 c)) with the projection fixed. The
    scores are linear in θ, so J and Jᵀ are written out: J(dθ) = S*(Z T(dθ)), Jᵀ(u) = T*(U Z),
    with Z a row's projected samples (n h w, c), U = S(u) the 9 shifted copies of u
    (9, n h w) and T the taps order of `filter_taps`: one batched matmul each."""

    def __init__(self, samples: torch.Tensor, metric: torch.Tensor, target: torch.Tensor, reg: float,
                 precond: float):
        """samples (N, n, h w, c); metric (N n, 9, h, w) and target (N n, 1, h, w), both already
        multiplied by the sample weights (0 for empty slots)."""
        n, k, hw, c = samples.shape
        # Jᵀ sums each slot's product and then the slots, so that a row's numbers do not depend on
        # how many (zero-weight) slots its optimizer run covers: one product over all n h w pixels
        # is blocked by its length, and rounds otherwise with one slot more (MKL on AVX-512).
        self.slots = samples.reshape(n * k, hw, c)  # a copy only for several rows and a part of the memory
        self.z = self.slots.view(n, k * hw, c)
        self.metric, self.target = metric, target
        self.size = tuple(metric.shape[-2:])
        self.reg, self.precond = reg, precond

    def normal_equations(self, theta: torch.Tensor):
        """Gauss-Newton system at θ (N, 9 c): (b, A) with b = −(Jᵀ(M s − g) + reg² θ) and
        A(v) = JᵀMJ v + reg² v."""
        z, reg = self.z, self.reg
        n, khw, c = z.shape
        hw = self.size[0] * self.size[1]

        def jacobian(v: torch.Tensor) -> torch.Tensor:  # weights (N, 9 c) -> scores (N n, 1, h, w)
            return fold_taps(torch.bmm(z, filter_taps(v.view(n, c, 9))).view(-1, hw, 9), self.size)

        def jacobian_t(s: torch.Tensor) -> torch.Tensor:  # scores (N n, 1, h, w) -> weights (N, 9 c)
            u = F.unfold(s, 3, padding=1).transpose(1, 2)  # (N n, h w, 9)
            zu = torch.bmm(self.slots.transpose(1, 2), u).view(n, -1, c, 9).sum(1)  # (N, c, 9)
            return filter_taps(zu).reshape(n, 9 * c)

        scores = jacobian(theta)
        b = jacobian_t(self.target - UpsamplingMetric.apply(self.metric, scores)) - reg * (reg * theta)  # no negation op

        def normal_op(v: torch.Tensor) -> torch.Tensor:
            return jacobian_t(UpsamplingMetric.apply(self.metric, jacobian(v))) + reg * (reg * v)

        return b, normal_op


class ProjectFilterProblem:
    """The initialization problem of O target models at once: the same least squares as
    `FilterProblem`, but over projection and filter together, s = filter(project(x)), on K
    samples per object. θ per object (flattened to (O, D)) = (projection P (c, C), filter taps
    G (9, c)), G[k] the filter's tap (2 − k // 3, 2 − k % 3) (reversed, so that tap k's shift
    is row k of `F.unfold`). Written out at (P, G), per object:
        J(dP, dG) = S*((G dP) Xᵀ + dG Zᵀ),   Z = X Pᵀ the projected pixels (K h w, c),
        Jᵀ(u) = (Gᵀ U X, U Z),               U = S(u) the 9 shifted copies of u (9, K h w),
    S a convolution with fixed one-hot kernels and S* its transpose: batched matmuls over the
    objects instead of autograd's double backward."""

    def __init__(self, features: torch.Tensor, metric: torch.Tensor, target: torch.Tensor, channels: int,
                 regs: Sequence[float], precond: Sequence[float]):
        """features (O, K, C, h, w); metric (O*K, 9, h, w) and target (O*K, 1, h, w), both
        already multiplied by the sample weights."""
        o, k, c_in, h, w = features.shape
        self.shape = (o, k, c_in, channels, h, w)
        self.pixels = features.permute(0, 1, 3, 4, 2).reshape(o, k * h * w, c_in)  # X
        self.metric = metric
        self.target = target
        sizes = (channels * c_in, 9 * channels)
        self.reg2 = _blocks(sizes, tuple(r * r for r in regs), features.device)
        self.precond = _blocks(sizes, tuple(precond), features.device)

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """θ (O, D) -> views P (O, c, C), G (O, 9, c)."""
        o, _, c_in, c, _, _ = self.shape
        return theta[:, :c * c_in].view(o, c, c_in), theta[:, c * c_in:].view(o, 9, c)

    def _scores(self, taps: torch.Tensor) -> torch.Tensor:
        """S*: taps (O, K h w, 9) -> scores (O*K, 1, h, w)."""
        o, k, _, _, h, w = self.shape
        return fold_taps(taps.view(o * k, h * w, 9), (h, w))

    def normal_equations(self, theta: torch.Tensor):
        """Gauss-Newton system at θ (O, D): (b, A) as `FilterProblem.normal_equations`."""
        o, k, c_in, c, h, w = self.shape
        proj, taps = self.split(theta)
        x = self.pixels
        z = torch.bmm(x, proj.transpose(1, 2))  # (O, K h w, c)
        xz = torch.cat([x, z], dim=2).view(o * k, h * w, c_in + c)

        def jacobian(v: torch.Tensor) -> torch.Tensor:
            dp, dg = self.split(v)
            return self._scores(torch.baddbmm(torch.bmm(z, dg.transpose(1, 2)), x, torch.bmm(taps, dp).transpose(1, 2)))

        def jacobian_t(u: torch.Tensor, reg_v: torch.Tensor, sign: int = 1) -> torch.Tensor:  # + sign reg² ⊙ reg_v
            uxz = torch.bmm(F.unfold(u, 3, padding=1), xz).view(o, k, 9, c_in + c).sum(1)  # (O, 9, C + c)
            dp = torch.bmm(taps.transpose(1, 2), uxz[..., :c_in]).view(o, c_in, c)  # (c, C) read as (C, c)
            grad = torch.cat([dp, uxz[..., c_in:]], dim=1).view(o, -1)
            return torch.addcmul(grad, self.reg2, reg_v, value=sign)

        scores = self._scores(torch.bmm(z, taps.transpose(1, 2)))
        b = jacobian_t(self.target - UpsamplingMetric.apply(self.metric, scores), theta, sign=-1)  # no negation op

        def normal_op(v: torch.Tensor) -> torch.Tensor:
            return jacobian_t(UpsamplingMetric.apply(self.metric, jacobian(v)), v)

        return b, normal_op


@functools.lru_cache(maxsize=16)
def _blocks(sizes: tuple[int, ...], values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(sum(sizes),): values[i] repeated sizes[i] times, on the device; cached (only read), so
    that object starts do not rebuild it."""
    return to_device(torch.from_numpy(np.concatenate([np.full(n, v, np.float32) for n, v in zip(sizes, values)])),
                     device)


@functools.lru_cache(maxsize=16)
def _taps_order(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices between a filter weight flattened as (c, 3, 3) and the taps G (9, c) of
    `ProjectFilterProblem` (G[k, j] = weight[j, 8 − k]): (to taps, from taps), on the device;
    cached. One index_select each way instead of a flip, a transpose and a copy."""
    k, j = np.meshgrid(np.arange(9), np.arange(channels), indexing="ij")
    to_taps = (j * 9 + 8 - k).ravel()  # G flat position k c + j <- weight position j 9 + 8 - k
    return to_device(torch.from_numpy(to_taps), device), to_device(torch.from_numpy(np.argsort(to_taps)), device)


@functools.lru_cache(maxsize=16)
def _first_sample_weights(k: int, objects: int, device: torch.device) -> torch.Tensor:
    """`first_sample_weights(k)` for each of `objects` objects, (objects k, 1, 1, 1) on the
    device; cached (only read)."""
    return to_device(torch.from_numpy(np.tile(first_sample_weights(k), objects)), device).view(-1, 1, 1, 1)


def _initial_weights(in_channels: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A target model's starting weights (projection (c, C, 1, 1), filter (1, c, 3, 3)) on the
    CPU: PyTorch's default convolution init drawn from a private generator seeded with `seed`.
    Upstream reseeds the global RNG with 0 for every object, so every target model starts from
    the same draws; the private generator gives the same weights without reseeding."""
    generator = torch.Generator().manual_seed(seed)
    weights = []
    for shape in ((channels, in_channels, 1, 1), (1, channels, 3, 3)):
        w = torch.empty(shape)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        weights.append(w)
    return weights[0], weights[1]


@functools.lru_cache(maxsize=16)
def _initial_theta(in_channels: int, channels: int, seed: int, device: torch.device) -> torch.Tensor:
    """`_initial_weights` as one `TargetModelTable` θ row (1, D) on the device; cached (only read)."""
    project, filter_weight = _initial_weights(in_channels, channels, seed)
    return to_device(torch.cat([project.view(-1), filter_weight.view(-1)]).view(1, -1), device)


def _stack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack; one tensor repeated (the same model on N frames) expands without a copy."""
    if all(t is tensors[0] for t in tensors):
        return tensors[0].unsqueeze(0).expand(len(tensors), *tensors[0].shape)
    return torch.stack(list(tensors))


@functools.lru_cache(maxsize=256)
def row_index(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Row indices as an index tensor on the device; cached (only read): a frame's rows repeat
    every frame."""
    return to_device(torch.tensor(rows), device)


def _selection(rows: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """Table rows -> what indexes them: a slice (views, no copies) when they are consecutive
    and ascending, else an index tensor on the device."""
    first = rows[0]
    if list(rows) == list(range(first, first + len(rows))):
        return slice(first, first + len(rows))
    return row_index(tuple(rows), device)


@dataclass
class CGState:
    """What the conjugate gradient carries from one run to the next, per row: the search
    direction (O, D), ρ = rᵀz (O, 1) and the last residual r (O, D) (Polak-Ribière's r_prev
    for the next run's first step)."""

    direction: torch.Tensor
    rho: torch.Tensor
    residual: torch.Tensor


class GaussNewtonCG:
    """Gauss-Newton steps, each solving JᵀMJ δ = −Jᵀ(M s − g) (regularization included) by
    preconditioned conjugate gradient (Polak-Ribière, β ≥ 0), as FRTM's optimizer, for O
    independent problems at once: θ (O, D), one row per object, updated in place; every CG
    scalar is per row. The CG state (`state`: direction, ρ, last residual) persists across
    runs, given by the caller (`CGState`) or fresh; ρ is divided by `forget_factor` at the start
    of each CG run so old directions fade. The dot products of ρ and β are a product and a sum
    (which round each row as it would alone). `row_exact`: so is α's dᵀAd; else one `bmm` (one
    op instead of two, but a `bmm` over several rows rounds each row otherwise than over one)."""

    def __init__(self, problem, theta: torch.Tensor, forget_factor: float, state: CGState | None = None,
                 row_exact: bool = True):
        self.problem = problem
        self.row_exact = row_exact
        self.theta = theta
        self.forget_factor = forget_factor
        self.direction: torch.Tensor | None = None if state is None else state.direction
        self.rho: torch.Tensor | None = None if state is None else state.rho
        # The residual r and the previous one, r_prev, as the two halves of one tensor (2, O, D),
        # so that one product gives both rᵀz and r_prevᵀz; half `self.current` is r.
        if state is None:
            self.residuals = torch.zeros(2, *theta.shape, device=theta.device)
        else:
            self.residuals = torch.stack([state.residual, torch.empty_like(state.residual)])
        self.current = 0

    @property
    def state(self) -> CGState | None:
        """The state for the next run (None before the first)."""
        return None if self.direction is None else CGState(self.direction, self.rho, self.residuals[self.current])

    def run(self, cg_iters: Sequence[int]) -> None:
        """One GN step per entry of cg_iters, with that many CG iterations."""
        with torch.no_grad():
            for n in cg_iters:
                b, normal_op = self.problem.normal_equations(self.theta)
                self.theta += self._conjugate_gradient(b, normal_op, n)

    def _next_residual(self) -> torch.Tensor:
        """The row to write the next r into (it holds r_prev, no longer needed); it becomes r."""
        self.current = 1 - self.current
        return self.residuals[self.current]

    def _conjugate_gradient(self, b: torch.Tensor, normal_op, iters: int) -> torch.Tensor:
        """The step δ: A δ = b solved approximately."""
        if self.forget_factor == 0:
            self.direction, self.rho = None, None
        elif self.direction is not None:
            self.rho = self.rho / self.forget_factor
        r = self._next_residual()
        r.copy_(b)
        step = torch.zeros_like(b)
        for i in range(iters):
            z = r / self.problem.precond
            rho_prev = self.rho
            # (2, O, 1): rᵀz and r_prevᵀz per row, always as a product and a sum (ρ and β as one
            # `bmm` moved a lone start's scores past upstream's spread: tests/golden_upstream)
            dots = (self.residuals * z).sum(2, keepdim=True)
            self.rho = dots[self.current]
            if self.direction is None:
                self.direction = z
            else:
                beta = ((self.rho - dots[1 - self.current]) / rho_prev).clamp(min=0)
                self.direction = torch.addcmul(z, self.direction, beta)
            q = normal_op(self.direction)
            alpha = self.rho / ((self.direction * q).sum(1, keepdim=True) if self.row_exact else
                                torch.bmm(self.direction.unsqueeze(1), q.unsqueeze(2)).view(-1, 1))
            step = self.direction * alpha if i == 0 else torch.addcmul(step, self.direction, alpha)
            if i < iters - 1:
                r = torch.addcmul(r, q, alpha, value=-1, out=self._next_residual())
        return step


class TargetModelTable:
    """The target models of many objects as the rows of one set of stacked tensors: per row, the
    weights θ = (projection (c, C), filter (c, 3, 3)) and a sample memory of fixed capacity S
    (`memory_size`).

    FRTM's memory: the K first samples weigh 2/K (the frame itself) and 1/K (its augmentations),
    normalized; a new sample replaces the lowest-weight slot and gets its weight from the
    learning rate. Empty slots weigh 0 and add nothing to the optimizer's sums, so all rows
    share one shape and the scores, inserts and optimizer runs of many objects (of one sequence
    or of several tracked in lockstep) are batched matmuls over rows. Slots fill in order, so a
    row's samples are the prefix of its `sizes[row]` slots, and an optimizer run needs only the
    rows' longest prefix. The sample weights are bookkept on the host (`host_weights`, numpy
    float32), so choosing a slot never waits on the device nor dispatches an op.

    All rows have one config, feature size (h, w) and label size (H, W). `add` starts objects
    on rows (the table grows by doubling) and `release` hands rows back for later objects.
    """

    def __init__(self, in_channels: int, config: TargetModelConfig, feature_size: tuple[int, int],
                 label_size: tuple[int, int], device: torch.device | str = "cpu", seed: int = 0,
                 score_fn: Callable | None = None, optimizer_fn: Callable | None = None, static_shapes: bool = False):
        self.config = config
        self.in_channels = in_channels
        self.feature_size = tuple(feature_size)
        self.label_size = tuple(label_size)
        self.device = torch.device(device)
        self.seed = seed
        # The tracker passes its (maybe compiled) functions; compiled ones want `static_shapes`.
        self.score_fn = score_fn or target_scores
        self.optimizer_fn = optimizer_fn or optimize_filters
        self.static_shapes = static_shapes
        self.upsampling = UpsamplingMetric.cached(self.feature_size, self.label_size, self.device)
        self.capacity = 0
        self.free: list[int] = []
        c, s = config.channels, config.memory_size
        h, w = self.feature_size
        self._shapes = {  # per row
            "theta": (c * in_channels + 9 * c,),
            "samples": (s, h * w, c),  # projected samples, channels last
            "metrics": (s, 9, h, w),  # `UpsamplingMetric.encode` of each sample's label and pixel weights
            "targets": (s, 1, h, w),
            "current": (h * w, c),  # the last projected sample (the next update's sample)
            "direction": (9 * c,), "rho": (1,), "residual": (9 * c,),  # the filter optimizer's `CGState`
        }
        for name, shape in self._shapes.items():
            setattr(self, name, torch.zeros(0, *shape, device=self.device))
        self.host_weights = np.zeros((0, s), np.float32)
        self.weights = self._device_weights()
        self.sizes = np.zeros(0, np.int64)  # filled slots per row
        self.last_slot = np.zeros(0, np.int64)  # the slot of the row's last insert, -1 before any
        self.applications = np.zeros(0, np.int64)  # scores computed per row (every train_skipping-th: optimize)
        self.used = np.zeros(0, bool)  # rows an earlier object held (their empty slots are not zeros)

    @property
    def forget_factor(self) -> float:
        return (1 - self.config.precond_lr) ** self.config.cg_forgetting_rate

    # -- rows ------------------------------------------------------------------------------------

    def _allocate(self, n: int) -> list[int]:
        if len(self.free) < n:
            self._grow(max(2 * self.capacity, self.capacity + n - len(self.free)))
        self.free.sort()
        rows, self.free = self.free[:n], self.free[n:]
        return rows

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for name, shape in self._shapes.items():
            grown = torch.zeros(capacity, *shape, device=self.device)
            if old:
                grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        for name in ("host_weights", "sizes", "last_slot", "applications", "used"):
            kept = getattr(self, name)
            setattr(self, name, np.concatenate([kept, np.zeros((capacity - old, *kept.shape[1:]), kept.dtype)]))
        self.weights = self._device_weights()
        self.free.extend(range(old, capacity))
        self.capacity = capacity

    def _device_weights(self) -> torch.Tensor:
        """The sample weights on the device (on the CPU a view of the host weights: no copy)."""
        return to_device(torch.from_numpy(self.host_weights), self.device)

    def _send_weights(self, rows: Sequence[int]) -> None:
        """The rows' changed sample weights to the device: only those rows are copied (on the
        CPU `weights` is a view of the host weights: nothing to copy)."""
        if self.device.type != "cpu":
            self.weights[_selection(rows, self.device)] = to_device(torch.from_numpy(self.host_weights[rows]),
                                                                    self.device)

    def release(self, rows: Sequence[int]) -> None:
        """Hand rows back: their objects are no longer tracked."""
        self.free.extend(r for r in rows if r not in self.free)

    def weights_of(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's weights as convolution weights: (projection (c, C, 1, 1), filter (1, c, 3, 3))."""
        c, c_in = self.config.channels, self.in_channels
        return self.theta[row, :c * c_in].view(c, c_in, 1, 1).clone(), self.theta[row, c * c_in:].view(1, c, 3, 3).clone()

    # -- the target models' work ---------------------------------------------------------------

    def add(self, features: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
            initial: torch.Tensor | None = None) -> list[int]:
        """Start O objects, each trained on its augmented first frame: features[i] (K, C, h, w),
        masks[i] (K, 1, H, W) (the frame first), from the weights `initial` (O, D) as θ rows
        (default: the seed's). Projection and filter are optimized together by Gauss-Newton on
        the raw features, then the samples are projected into the object's memory and the
        filter alone is optimized. Always in full fp32. -> the objects' rows."""
        rows = self._allocate(len(features))
        cfg, c, c_in = self.config, self.config.channels, self.in_channels
        o, k = len(rows), features[0].shape[0]
        with torch.no_grad(), full_fp32(self.device):
            x = (features[0][None] if o == 1 else torch.stack(list(features))).float()  # (O, K, C, h, w)
            m = (masks[0] if o == 1 else torch.cat(list(masks))).float()  # (O K, 1, H, W)
            metrics, targets = self.upsampling.encode(m, pixel_weights(m, cfg.pixel_weighting, cfg.target_fraction))
            sample_weights = _first_sample_weights(k, o, self.device)
            if initial is None:
                initial = _initial_theta(c_in, c, self.seed, self.device).expand(o, -1)
            to_taps, from_taps = _taps_order(c, self.device)
            theta = torch.cat([initial[:, :c * c_in], initial[:, c * c_in:].index_select(1, to_taps)], dim=1)
            problem = ProjectFilterProblem(x, metrics * sample_weights, targets * sample_weights, c,
                                           cfg.filter_reg, cfg.precond)
            GaussNewtonCG(problem, theta, self.forget_factor, row_exact=o > 1).run(cfg.init_iters)
            project, taps = problem.split(theta)
            sel = _selection(rows, self.device)
            self.theta[sel, :c * c_in] = project.reshape(o, -1)
            self.theta[sel, c * c_in:] = taps.reshape(o, -1).index_select(1, from_taps)
            self.samples[sel, :k] = torch.bmm(problem.pixels, project.transpose(1, 2)).view(o, k, -1, c)
            self.metrics[sel, :k] = metrics.view(o, k, *metrics.shape[1:])
            self.targets[sel, :k] = targets.view(o, k, *targets.shape[1:])
            self.host_weights[rows] = 0
            self.host_weights[rows, :k] = first_sample_weights(k)
            if self.used[rows].any():  # the earlier objects' samples: zeros again (0 weight x NaN is NaN)
                for buffer in (self.samples, self.metrics, self.targets):
                    buffer[sel, k:] = 0
            self.sizes[rows], self.last_slot[rows], self.applications[rows], self.used[rows] = k, -1, 0, True
            self._send_weights(rows)
            self.optimize(rows, cfg.update_iters, fresh=True)
        return rows

    def scores(self, rows: Sequence[int], layer4: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """The rows' scores: layer4 (F, C, h, w) any float dtype; row i on frame `frames[i]` (an
        index tensor; None: F == 1 serves all rows, or the rows' frames in order) -> fp32 scores
        (N, 1, h, w). Remembers each row's projected sample (for `update`) and counts the
        application."""
        n, c = len(rows), self.config.channels
        run = pad_to_bucket(list(rows)) if self.static_shapes else list(rows)  # see `optimize`
        padded = len(run)
        sel = _selection(run, self.device)
        with torch.no_grad(), full_fp32(self.device):
            f, c_in, h, w = layer4.shape
            pixels = layer4.float().permute(0, 2, 3, 1).reshape(f, h * w, c_in)
            if padded > n and (frames is not None or f > 1):
                last = row_index(tuple(pad_to_bucket(list(range(n)))), self.device)
                frames = last if frames is None else frames.index_select(0, last)
            if frames is not None:
                pixels = pixels.index_select(0, frames)
            theta = self.theta[sel]
            z, scores = self.score_fn(pixels, theta[:, :c * c_in].view(padded, c, c_in),
                                      theta[:, c * c_in:].view(padded, c, 9), (h, w))
            if padded > n:
                sel, z, scores = _selection(rows, self.device), z[:n], scores[:n]
            self.current[sel] = z
        self.applications[list(rows)] += 1
        return scores

    def update(self, rows: Sequence[int], soft_masks: torch.Tensor, enough_foreground: Sequence[bool]) -> None:
        """After a computed frame: each row with enough foreground (the config's
        `enough_foreground` of its soft mask, fetched by the caller) stores its last sample with
        its soft mask (N, 1, H, W); every `train_skipping`-th application the rows re-optimize
        their filters (together)."""
        chosen = [j for j, enough in enumerate(enough_foreground) if enough]
        if not chosen:
            return
        cfg = self.config
        with torch.no_grad(), full_fp32(self.device):
            masks = (soft_masks if len(chosen) == len(rows) else soft_masks[_selection(chosen, self.device)]).float()
            pw = pixel_weights((masks > 0.5).float(), cfg.pixel_weighting, cfg.target_fraction)
            metrics, targets = self.upsampling.encode(masks, pw)
            chosen_rows = [rows[j] for j in chosen]
            self.insert(chosen_rows, metrics, targets)
            due = [r for r in chosen_rows if self.applications[r] % cfg.train_skipping == 0]
            if due:
                self.optimize(due, cfg.update_iters)

    def insert(self, rows: Sequence[int], metrics: torch.Tensor, targets: torch.Tensor) -> None:
        """Store each row's last projected sample with its label, as `UpsamplingMetric.encode`
        gives it: metrics (N, 9, h, w), targets (N, 1, h, w)."""
        slots = [self._next_slot(r) for r in rows]
        if len(rows) == 1:
            index = (rows[0], slots[0])
            self.samples[index] = self.current[rows[0]]
            self.metrics[index], self.targets[index] = metrics[0], targets[0]
        else:
            index = tuple(to_device(torch.tensor([rows, slots]), self.device))
            self.samples[index] = self.current[index[0]]
            self.metrics[index], self.targets[index] = metrics, targets
        self._send_weights(rows)

    def _next_slot(self, row: int) -> int:
        """The slot of a row's new sample, its weights updated (host only)."""
        w = self.host_weights[row]
        lr = self.config.learning_rate
        if lr == 1:
            w[:] = 0
            slot = 0
            w[0] = 1
        else:
            slot = int(np.argmin(w))  # the first minimum: the first empty slot while there is one
            if self.last_slot[row] < 0:
                w /= 1 - lr
                w[slot] = lr
            else:
                # As upstream: the new weight derives from the previous insert's weight and the
                # old weights are not decayed again before renormalizing.
                w[slot] = w[self.last_slot[row]] / (1 - lr)
        w /= w.sum()
        self.sizes[row] = min(self.sizes[row] + 1, self.config.memory_size)
        self.last_slot[row] = slot
        return slot

    def optimize(self, rows: Sequence[int], cg_iters: Sequence[int], fresh: bool = False) -> None:
        """Gauss-Newton on the rows' filters over their memories, the rows together; `fresh`:
        the rows' first run (no conjugate-gradient state carried over). With `static_shapes`
        the run covers every slot and a power-of-two number of rows (the last one repeated,
        its copies discarded), so that a compiled `optimizer_fn` sees few shapes."""
        n = len(rows)
        run = pad_to_bucket(list(rows)) if self.static_shapes else list(rows)
        sel = _selection(run, self.device)
        c, c_in = self.config.channels, self.in_channels
        slots = self.config.memory_size if self.static_shapes else int(self.sizes[list(rows)].max())
        state = None if fresh else (self.direction[sel], self.rho[sel], self.residual[sel])
        with torch.no_grad(), full_fp32(self.device):
            filters, direction, rho, residual = self.optimizer_fn(
                self.samples[sel, :slots], self.metrics[sel, :slots], self.targets[sel, :slots],
                self.weights[sel, :slots], self.theta[sel, c * c_in:], state, tuple(cg_iters),
                self.config.filter_reg[1], self.config.precond[1], self.forget_factor)
        if len(run) > n:
            sel = _selection(rows, self.device)
            filters, direction, rho, residual = filters[:n], direction[:n], rho[:n], residual[:n]
        self.theta[sel, c * c_in:] = filters
        self.direction[sel], self.rho[sel], self.residual[sel] = direction, rho, residual


def optimize_filters(samples: torch.Tensor, metrics: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                     filters: torch.Tensor, state: tuple | None, cg_iters: tuple[int, ...], reg: float,
                     precond: float, forget_factor: float) -> tuple[torch.Tensor, ...]:
    """The filter re-optimisation of N target models as one function (a compiled region with
    `--compile`): samples (N, S, h w, c), metrics (N, S, 9, h, w), targets (N, S, 1, h, w) and
    sample weights (N, S) of their memories; filters (N, 9 c); state the conjugate gradient's
    (direction (N, 9 c), ρ (N, 1), last residual (N, 9 c)), None for a first run. -> (the new
    filters, the new state). Its inputs are left as they are (a CUDA graph can capture it)."""
    sample_weights = weights.reshape(-1, 1, 1, 1)
    problem = FilterProblem(samples, metrics.flatten(0, 1) * sample_weights, targets.flatten(0, 1) * sample_weights,
                            reg, precond)
    optimizer = GaussNewtonCG(problem, filters.clone(), forget_factor, None if state is None else CGState(*state))
    optimizer.run(cg_iters)
    state = optimizer.state
    return optimizer.theta, state.direction, state.rho, state.residual


def pad_to_bucket(items: list) -> list:
    """`items` with the last one repeated up to a power-of-two count (a compiled region's batch:
    few shapes; the extra outputs are discarded)."""
    return items + items[-1:] * ((1 << (len(items) - 1).bit_length()) - len(items))


class TargetModel(nn.Module):
    """One object's target model as a module, score = filter(project(layer4)) at stride 16: what
    training caches (its weights save and load as `project.weight` and `filter.weight`). It is a
    `TargetModelTable` of one row once initialized; the tracker keeps all its objects' target
    models as the rows of such tables."""

    def __init__(self, in_channels: int, config: TargetModelConfig, device: torch.device | str = "cpu",
                 seed: int = 0):
        super().__init__()
        self.config = config
        self.seed = seed
        self.project = nn.Conv2d(in_channels, config.channels, 1, bias=False, device="meta")
        self.filter = nn.Conv2d(config.channels, 1, 3, padding=1, bias=False, device="meta")
        project, filter_weight = _initial_weights(in_channels, config.channels, seed)
        self.project.weight = nn.Parameter(project.to(device), requires_grad=False)
        self.filter.weight = nn.Parameter(filter_weight.to(device), requires_grad=False)
        self.table: TargetModelTable | None = None  # after `initialize`: the row 0 of this table

    @property
    def device(self) -> torch.device:
        return self.project.weight.device

    def initialize(self, features: torch.Tensor, masks: torch.Tensor) -> None:
        """Train from the augmented first frame, starting from the current weights: features
        (K, C_in, h, w), masks (K, 1, H, W). Always in full fp32, whatever the features' precision."""
        self.table = TargetModelTable(features.shape[1], self.config, tuple(features.shape[-2:]),
                                      tuple(masks.shape[-2:]), self.device, self.seed)
        initial = torch.cat([self.project.weight.view(1, -1), self.filter.weight.view(1, -1)], dim=1)
        self.table.add([features], [masks], initial=initial)
        self._copy_weights()

    def _copy_weights(self) -> None:
        project, filter_weight = self.table.weights_of(0)
        self.project.weight.copy_(project)
        self.filter.weight.copy_(filter_weight)

    def load_trained(self, state_dict: dict) -> None:
        """Use an already trained (cached) target model; it will not be updated."""
        self.load_state_dict(state_dict, strict=True)
        for p in self.parameters():
            p.requires_grad_(False)
        self.table = None

    def apply(self, layer4: torch.Tensor) -> torch.Tensor:
        """layer4 (N, C_in, h, w), any float dtype -> fp32 scores (N, 1, h, w)."""
        if self.table is not None and layer4.shape[0] == 1:  # remembers the sample for `update`
            return self.table.scores([0], layer4)
        return TargetModel.apply_many([self] * layer4.shape[0], layer4)

    @staticmethod
    def apply_many(models: Sequence["TargetModel"], layer4: torch.Tensor) -> torch.Tensor:
        """Model i on layer4[i]: N models (same config and device), layer4 (N, C_in, h, w) any
        float dtype -> fp32 scores (N, 1, h, w), in one batch."""
        n, c_in, h, w = layer4.shape
        if len(models) != n:
            raise ValueError(f"{len(models)} target models for a batch of {n}")
        c = models[0].config.channels
        with torch.no_grad(), full_fp32(models[0].device):
            project = _stack_rows([m.project.weight.detach().view(c, c_in) for m in models])
            filter_weight = _stack_rows([m.filter.weight.detach().view(c, 9) for m in models])
            pixels = layer4.float().permute(0, 2, 3, 1).reshape(n, h * w, c_in)
            return target_scores(pixels, project, filter_weight, (h, w))[1]

    def update(self, soft_mask: torch.Tensor) -> None:
        """After `apply` on a computed frame: `TargetModelTable.update` with the soft mask (1, 1, H, W)."""
        if self.table is None:
            raise RuntimeError("update needs a target model trained by initialize (not load_trained)")
        self.table.update([0], soft_mask, [bool(self.config.enough_foreground(soft_mask)[0])])
        self._copy_weights()
