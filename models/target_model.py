"""FRTM's target model: a per-object 2-layer conv optimized online by Gauss-Newton with
conjugate-gradient inner loops on a weighted least-squares loss (FRTM, Robinson et al., CVPR 2020).

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

from .precision import full_fp32, to_device


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


class SampleMemory:
    """Training samples of a target model with FRTM's sample weighting.

    The first sample gets weight 2/K, the others 1/K (normalized). A new sample replaces the
    lowest-weight slot and gets its weight from the learning rate. Labels and pixel weights are
    kept in the score-resolution form of `UpsamplingMetric`: per sample, the metric M (9, h, w)
    and g = Uᵀ(w² ⊙ y) (1, h, w).

    The sample weights are bookkept on the host (`host_weights`, float32 like the device copy
    `weights`), so choosing a slot or the active samples never waits on the device.
    """

    def __init__(self, capacity: int, feature_shape: Sequence[int], label_size: Sequence[int],
                 device: torch.device | str, learning_rate: float, upsampling: "UpsamplingMetric | None" = None):
        h, w = feature_shape[-2:]
        self.upsampling = upsampling if upsampling is not None else UpsamplingMetric((h, w), label_size, device)
        self.device = torch.device(device)
        self.samples = torch.zeros(capacity, *feature_shape, device=device).contiguous(memory_format=torch.channels_last)
        self.host_weights = torch.zeros(capacity)
        self.weights = to_device(self.host_weights, self.device)  # the same tensor on the CPU
        self.metrics = torch.zeros(capacity, 9, h, w, device=device)
        self.targets = torch.zeros(capacity, 1, h, w, device=device)
        self.capacity = capacity
        self.size = 0
        self.learning_rate = learning_rate
        self._last_slot: int | None = None

    @staticmethod
    def first_weights(k: int) -> torch.Tensor:
        """Host weights (K,) of the K first samples: 2/K for the first, 1/K for the others, normalized."""
        w = torch.full((k,), 1.0 / k)
        w[0] = 2.0 / k
        return w / w.sum()

    def initialize(self, features: torch.Tensor, labels: torch.Tensor | None, pixel_weights: torch.Tensor | None,
                   encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """features (K, C, h, w), labels and pixel_weights (K, 1, H, W); or instead of those two
        `encoded`, the (metrics (K, 9, h, w), targets (K, 1, h, w)) they encode to."""
        k = features.shape[0]
        self.samples[:k] = features.detach()
        self.host_weights[:k] = self.first_weights(k)
        self.weights = to_device(self.host_weights, self.device)
        self.metrics[:k], self.targets[:k] = encoded if encoded is not None else \
            self.upsampling.encode(labels, pixel_weights)
        self.size = k

    def insert(self, feature: torch.Tensor, metric: torch.Tensor, target: torch.Tensor) -> None:
        """Insert one sample: feature (1, C, h, w) and its label and pixel weights as `UpsamplingMetric.encode`
        gives them, metric (1, 9, h, w) and target (1, 1, h, w)."""
        slot = self._update_weights()
        self.samples[slot] = feature.detach()[0]
        self.metrics[slot], self.targets[slot] = metric[0], target[0]
        self.size = min(self.size + 1, self.capacity)
        self._last_slot = slot

    def active(self) -> slice | np.ndarray:
        """Slots with weight > 0, from the host weights: a slice when they are a prefix (the
        usual case: views, no copies), else their indices."""
        active = np.flatnonzero(self.host_weights.numpy() > 0)
        n = active.size
        return slice(0, n) if n == 0 or active[-1] == n - 1 else active

    def _update_weights(self) -> int:
        w = self.host_weights
        lr = self.learning_rate
        if self.size == 0 or lr == 1:
            w[:] = 0
            w[0] = 1
            slot = 0
        else:
            slot = int(np.argmin(w.numpy()))  # first minimum, as torch.argmin
            if self._last_slot is None:
                w /= 1 - lr
                w[slot] = lr
            else:
                # As upstream: the new weight derives from the previous insert's weight and the
                # old weights are not decayed again before renormalizing.
                w[slot] = w[self._last_slot] / (1 - lr)
        w /= w.sum()
        self.weights = to_device(w, self.device)
        return slot


class FilterProblem:
    """The update problem: weighted least squares over the memory's active samples (weight > 0),
    ‖sqrt(sample weight) · w ⊙ (resize(filter(x), label size) − y)‖² + ‖reg · θ‖², θ the filter
    weights flattened to (1, D). The scores are linear in θ, so J and Jᵀ are written out (a
    filtering and a correlation, both one GEMM)."""

    def __init__(self, memory: SampleMemory, regs: Sequence[float], precond: Sequence[float]):
        self.memory = memory
        (self.reg,) = regs
        (self.precond,) = precond
        self.x = self.metric = self.target = None

    def select_samples(self) -> None:
        m = self.memory
        active = m.active()
        if not isinstance(active, slice):
            active = to_device(torch.from_numpy(active), m.device)
        sample_weights = m.weights[active].view(-1, 1, 1, 1)
        self.x = m.samples[active]
        self.metric = m.metrics[active] * sample_weights
        self.target = m.targets[active] * sample_weights

    def normal_equations(self, theta: torch.Tensor):
        """Gauss-Newton system at θ (1, D): (b, A) with b = −(Jᵀ(M s − g) + reg² θ) and
        A(v) = JᵀMJ v + reg² v, J the Jacobian of the scores."""
        x, reg = self.x, self.reg
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)

        def jacobian(v: torch.Tensor) -> torch.Tensor:  # filter weights (1, D) -> scores (N, 1, h, w)
            return ScoreFilter.filter(pixels, v.view(1, c, 3, 3), (n, h, w))

        def jacobian_t(s: torch.Tensor) -> torch.Tensor:  # scores (N, 1, h, w) -> weights (1, D)
            sp = F.pad(s, (1, 1, 1, 1))
            shifted = torch.stack([sp[:, 0, 2 - i:2 - i + h, 2 - j:2 - j + w] for i in range(3) for j in range(3)])
            return (shifted.reshape(9, -1) @ pixels).t().reshape(1, c * 9)

        scores = jacobian(theta)
        b = -(jacobian_t(UpsamplingMetric.apply(self.metric, scores) - self.target) + reg * (reg * theta))

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

    def select_samples(self) -> None:
        pass  # fixed samples

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """θ (O, D) -> views P (O, c, C), G (O, 9, c)."""
        o, _, c_in, c, _, _ = self.shape
        return theta[:, :c * c_in].view(o, c, c_in), theta[:, c * c_in:].view(o, 9, c)

    def _scores(self, taps: torch.Tensor) -> torch.Tensor:
        """S*: taps (O, K h w, 9) -> scores (O*K, 1, h, w)."""
        o, k, _, _, h, w = self.shape
        return F.fold(taps.view(o * k, h * w, 9).transpose(1, 2), (h, w), 3, padding=1)

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

        def jacobian_t(u: torch.Tensor, reg_v: torch.Tensor) -> torch.Tensor:  # + reg² ⊙ reg_v
            uxz = torch.bmm(F.unfold(u, 3, padding=1), xz).view(o, k, 9, c_in + c).sum(1)  # (O, 9, C + c)
            dp = torch.bmm(taps.transpose(1, 2), uxz[..., :c_in]).view(o, c_in, c)  # (c, C) read as (C, c)
            grad = torch.cat([dp, uxz[..., c_in:]], dim=1).view(o, -1)
            return torch.addcmul(grad, self.reg2, reg_v)

        scores = self._scores(torch.bmm(z, taps.transpose(1, 2)))
        b = -jacobian_t(UpsamplingMetric.apply(self.metric, scores) - self.target, theta)

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
    """`SampleMemory.first_weights(k)` for each of `objects` objects, (objects k, 1, 1, 1) on the
    device; cached (only read)."""
    return to_device(SampleMemory.first_weights(k).repeat(objects), device).view(-1, 1, 1, 1)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack, a view for a single tensor (one object starting: no copy)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


class GaussNewtonCG:
    """Gauss-Newton steps, each solving JᵀMJ δ = −Jᵀ(M s − g) (regularization included) by
    preconditioned conjugate gradient (Polak-Ribière, β ≥ 0), as FRTM's optimizer, for O
    independent problems at once: θ (O, D), one row per object, updated in place; every CG
    scalar is per row. The CG direction and ρ persist across runs; ρ is divided by
    `forget_factor` at the start of each CG run so old directions fade."""

    def __init__(self, problem, theta: torch.Tensor, forget_factor: float):
        self.problem = problem
        self.theta = theta
        self.forget_factor = forget_factor
        self.direction: torch.Tensor | None = None
        self.rho: torch.Tensor | None = None
        # The residual r and the previous one, r_prev, as the two rows of one tensor (O, 2, D),
        # so that one batched matmul gives both rᵀz and r_prevᵀz; row `self.current` is r.
        self.residuals = torch.zeros(theta.shape[0], 2, theta.shape[1], device=theta.device)
        self.current = 0

    def run(self, cg_iters: Sequence[int]) -> None:
        """One GN step per entry of cg_iters, with that many CG iterations."""
        self.problem.select_samples()
        with torch.no_grad():
            for n in cg_iters:
                b, normal_op = self.problem.normal_equations(self.theta)
                self.theta += self._conjugate_gradient(b, normal_op, n)

    def _next_residual(self) -> torch.Tensor:
        """The row to write the next r into (it holds r_prev, no longer needed); it becomes r."""
        self.current = 1 - self.current
        return self.residuals[:, self.current]

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
            dots = torch.bmm(self.residuals, z.unsqueeze(2))
            self.rho = dots[:, self.current]
            if self.direction is None:
                self.direction = z
            else:
                beta = ((self.rho - dots[:, 1 - self.current]) / rho_prev).clamp(min=0)
                self.direction = torch.addcmul(z, self.direction, beta)
            q = normal_op(self.direction)
            alpha = self.rho / torch.bmm(self.direction.unsqueeze(1), q.unsqueeze(2)).view(-1, 1)
            step = self.direction * alpha if i == 0 else torch.addcmul(step, self.direction, alpha)
            if i < iters - 1:
                r = torch.addcmul(r, q, alpha, value=-1, out=self._next_residual())
        return step


class ScoreFilter(nn.Conv2d):
    """3x3 convolution to one output channel, computed as a channel matmul per kernel tap and a
    sum of 9 shifted maps: the same function as nn.Conv2d (padding 1, no bias), but one-channel
    convolutions are very slow in oneDNN and the optimizer applies this one to the whole memory."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.filter(x.permute(0, 2, 3, 1).reshape(n * h * w, c), self.weight, (n, h, w))

    @staticmethod
    def filter(pixels: torch.Tensor, weight: torch.Tensor, shape) -> torch.Tensor:
        """pixels (N*h*w, C) (channels-last features, a free view), weight (1, C, 3, 3) -> (N, 1, h, w).
        One matmul gives each pixel's 9 tap values; `F.fold` sums them into place. Fold row k
        lands at offset (k // 3 − 1, k % 3 − 1), so it takes tap 8 − k (hence the flip)."""
        n, h, w = shape
        c = pixels.shape[1]
        taps = pixels @ weight[0].reshape(c, 9).flip(1)  # (N h w, 9)
        return F.fold(taps.view(n, h * w, 9).transpose(1, 2), (h, w), 3, padding=1)


def project_and_filter(layer4: torch.Tensor, project_weight: torch.Tensor,
                       filter_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A target model's score as a function of its weights: layer4 (N, C_in, h, w) fp32,
    project_weight (c, C_in, 1, 1), filter_weight (1, c, 3, 3) -> (projected sample
    (N, c, h, w), score (N, 1, h, w))."""
    projected = F.conv2d(layer4, project_weight)
    n, c, h, w = projected.shape
    return projected, ScoreFilter.filter(projected.permute(0, 2, 3, 1).reshape(n * h * w, c), filter_weight, (n, h, w))


class TargetModel(nn.Module):
    """Per-object target model: score = filter(project(layer4)) at stride 16."""

    def __init__(self, in_channels: int, config: TargetModelConfig, device: torch.device | str = "cpu",
                 seed: int = 0, score_fn: Callable | None = None):
        super().__init__()
        self.config = config
        self.score_fn = score_fn or project_and_filter  # the tracker passes its (maybe compiled) one
        with torch.random.fork_rng(devices=[]):  # the default init is replaced below: leave the global RNG alone
            self.project = nn.Conv2d(in_channels, config.channels, 1, bias=False)
            self.filter = ScoreFilter(config.channels)
        # Upstream reseeds the global RNG with 0 for every object, so every target model starts
        # from the same draws; a private generator gives the same weights without reseeding.
        generator = torch.Generator().manual_seed(seed)
        for conv_layer in (self.project, self.filter):
            nn.init.kaiming_uniform_(conv_layer.weight, a=math.sqrt(5), generator=generator)
        self.to(device)
        for p in self.parameters():
            p.requires_grad_(False)
        self.applications = 0
        self.current_sample: torch.Tensor | None = None
        self.memory: SampleMemory | None = None
        self.update_optimizer: GaussNewtonCG | None = None

    @property
    def forget_factor(self) -> float:
        return (1 - self.config.precond_lr) ** self.config.cg_forgetting_rate

    @property
    def device(self) -> torch.device:
        return self.project.weight.device

    def initialize(self, features: torch.Tensor, masks: torch.Tensor) -> None:
        """Train from the augmented first frame: features (K, C_in, h, w), masks (K, 1, H, W).
        Always in full fp32, whatever the precision of the features."""
        self.initialize_many([self], features[None], masks[None])

    @staticmethod
    def initialize_many(models: Sequence["TargetModel"], features: torch.Tensor, masks: torch.Tensor) -> None:
        """Train O target models (same config and device) together, each from its augmented
        first frame: features (O, K, C_in, h, w), masks (O, K, 1, H, W). The same results as
        initializing them one by one, up to float rounding; fp32 whatever the features' precision."""
        with full_fp32(models[0].device):
            _initialize_many(models, features.float(), masks.float())

    def load_trained(self, state_dict: dict) -> None:
        """Use an already trained (cached) target model; it will not be updated."""
        self.load_state_dict(state_dict, strict=True)
        for p in self.parameters():
            p.requires_grad_(False)

    def apply(self, layer4: torch.Tensor) -> torch.Tensor:
        """layer4 (N, C_in, h, w), any float dtype -> fp32 scores (N, 1, h, w); remembers the
        projected sample."""
        self.applications += 1
        with torch.no_grad(), full_fp32(self.device):
            # plain tensors, not Parameters: a compiled score_fn then serves every object
            self.current_sample, score = self.score_fn(layer4.float(), self.project.weight.detach(),
                                                       self.filter.weight.detach())
            return score

    def update(self, soft_mask: torch.Tensor, enough_foreground: bool | None = None) -> None:
        """After a computed frame: store (last sample, soft mask (1, 1, H, W)) and every
        `train_skipping`-th application re-optimize the filter. `enough_foreground`: the
        config's `enough_foreground(soft_mask)` already fetched by the caller (else fetched
        here, which waits on the device)."""
        if enough_foreground is None:
            enough_foreground = bool(self.config.enough_foreground(soft_mask)[0])
        TargetModel.update_many([self], soft_mask, [enough_foreground])

    @staticmethod
    def update_many(models: Sequence["TargetModel"], soft_masks: torch.Tensor, enough_foreground: Sequence[bool]) -> None:
        """`update` of N target models (same config, device and sizes) after a computed frame:
        soft_masks (N, 1, H, W), enough_foreground (N,) fetched by the caller. The new samples'
        pixel weights and encodings are computed in one batch (the same numbers as one by one)."""
        chosen = [i for i, (model, enough) in enumerate(zip(models, enough_foreground))
                  if enough and model.current_sample is not None and model.memory is not None]
        if not chosen:
            return
        cfg = models[chosen[0]].config
        with full_fp32(models[chosen[0]].device):
            masks = (soft_masks if len(chosen) == len(models) else torch.cat([soft_masks[i:i + 1] for i in chosen])).float()
            pw = pixel_weights((masks > 0.5).float(), cfg.pixel_weighting, cfg.target_fraction)
            metrics, targets = models[chosen[0]].memory.upsampling.encode(masks, pw)
            for j, i in enumerate(chosen):
                models[i].memory.insert(models[i].current_sample, metrics[j:j + 1], targets[j:j + 1])
            for i in chosen:
                if models[i].applications % cfg.train_skipping == 0:
                    models[i].update_optimizer.run(cfg.update_iters)


def _initialize_many(models: Sequence[TargetModel], features: torch.Tensor, masks: torch.Tensor) -> None:
    """`TargetModel.initialize_many` in fp32: project and filter together by Gauss-Newton on the raw
    features, then re-project the samples into each model's memory and optimize the filter alone."""
    cfg = models[0].config
    o, k, c_in, h, w = features.shape
    c = cfg.channels
    device = features.device
    masks = masks.flatten(0, 1)
    pw = pixel_weights(masks, cfg.pixel_weighting, cfg.target_fraction)
    upsampling = UpsamplingMetric.cached((h, w), tuple(masks.shape[-2:]), device)
    metrics, targets = upsampling.encode(masks, pw)  # (O K, 9, h, w), (O K, 1, h, w)
    sample_weights = _first_sample_weights(k, o, device)

    # θ per object: projection (c, C_in), then the filter's taps reordered (see ProjectFilterProblem).
    to_taps, from_taps = _taps_order(c, device)
    proj = _stack([m.project.weight.view(-1) for m in models])
    taps = _stack([m.filter.weight.view(-1) for m in models]).index_select(1, to_taps)
    theta = torch.cat([proj, taps], dim=1)
    problem = ProjectFilterProblem(features, metrics * sample_weights, targets * sample_weights, c,
                                   cfg.filter_reg, cfg.precond)
    GaussNewtonCG(problem, theta, models[0].forget_factor).run(cfg.init_iters)
    proj, taps = problem.split(theta)

    # Re-project the samples (channels-last, as the memory keeps them); from now on only the
    # filter is optimized, on each object's own memory.
    projected = torch.bmm(problem.pixels, proj.transpose(1, 2)).view(o, k, h, w, c).permute(0, 1, 4, 2, 3)
    for i, model in enumerate(models):
        model.project.weight.copy_(proj[i].view(c, c_in, 1, 1))
        torch.index_select(taps[i].reshape(-1), 0, from_taps, out=model.filter.weight.view(-1))
        rows = slice(i * k, (i + 1) * k)
        model.memory = SampleMemory(cfg.memory_size, (c, h, w), masks.shape[-2:], device, cfg.learning_rate,
                                    upsampling)
        model.memory.initialize(projected[i], None, None, encoded=(metrics[rows], targets[rows]))
        problem = FilterProblem(model.memory, cfg.filter_reg[1:], cfg.precond[1:])
        model.update_optimizer = GaussNewtonCG(problem, model.filter.weight.view(1, -1), model.forget_factor)
        model.update_optimizer.run(cfg.update_iters)
