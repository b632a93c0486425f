"""FRTM's target model: a per-object 2-layer conv optimized online by Gauss-Newton with
conjugate-gradient inner loops on a weighted least-squares loss (FRTM, Robinson et al., CVPR 2020).

Shapes: K samples, C_in = layer4 channels, c = projection channels, (h, w) the stride-16
feature size, (H, W) the label (image) size.
"""
from __future__ import annotations

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
    fraction = count / (h * w)
    too_small = (count < 10).float()
    fraction = too_small * target_fraction + (1 - too_small) * fraction
    large = (fraction > target_fraction).float()
    tf = large * fraction + (1 - large) * target_fraction
    weight_fg = tf / fraction
    weight_bg = (1 - tf) / (1 - fraction)
    return torch.sqrt(weight_fg * y + weight_bg * (1 - y))


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
        self.ph = torch.stack([self.uh * self._shift_columns(self.uh, d) for d in (-1, 0, 1)])  # (3, H, h)
        self.pw = torch.stack([self.uw * self._shift_columns(self.uw, d) for d in (-1, 0, 1)])  # (3, W, w)

    @staticmethod
    def _upsampling_matrix(n: int, size: int, device) -> torch.Tensor:
        """(size, n): the weights F.interpolate(bilinear, align_corners=False) uses along one axis."""
        eye = torch.eye(n, device=device).view(1, 1, n, n)
        return F.interpolate(eye, (size, n), mode="bilinear", align_corners=False)[0, 0]

    @staticmethod
    def _shift_columns(m: torch.Tensor, d: int) -> torch.Tensor:
        """out[:, a] = m[:, a + d], zero where a + d is out of range."""
        out = torch.zeros_like(m)
        n = m.shape[1]
        if d >= 0:
            out[:, :n - d] = m[:, d:]
        else:
            out[:, -d:] = m[:, :n + d]
        return out

    def metric(self, weights: torch.Tensor) -> torch.Tensor:
        """Squared pixel weights (N, 1, H, W) -> M as 9 neighbour maps (N, 9, h, w)."""
        d = weights[:, 0]
        t = torch.matmul(d.unsqueeze(1), self.pw.unsqueeze(0))  # (N, 3 dx, H, w)
        m = torch.matmul(self.ph.transpose(1, 2).unsqueeze(0).unsqueeze(2), t.unsqueeze(1))  # (N, 3 dy, 3 dx, h, w)
        return m.flatten(1, 2)

    def adjoint(self, image: torch.Tensor) -> torch.Tensor:
        """Uᵀ applied to (N, 1, H, W) -> (N, 1, h, w)."""
        return torch.matmul(torch.matmul(self.uh.t(), image[:, 0]), self.uw).unsqueeze(1)

    @staticmethod
    def apply(metric: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """M v for v (N, 1, h, w) and M (N, 9, h, w)."""
        h, w = v.shape[-2:]
        vp = F.pad(v, (1, 1, 1, 1))
        out = None
        for k in range(9):
            dy, dx = divmod(k, 3)
            term = metric[:, k:k + 1] * vp[:, :, dy:dy + h, dx:dx + w]
            out = term if out is None else out + term
        return out


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
                 device: torch.device | str, learning_rate: float):
        h, w = feature_shape[-2:]
        self.upsampling = UpsamplingMetric((h, w), label_size, device)
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

    def _encode(self, labels: torch.Tensor, pixel_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        squared = pixel_weights * pixel_weights
        return self.upsampling.metric(squared), self.upsampling.adjoint(squared * labels.float())

    def initialize(self, features: torch.Tensor, labels: torch.Tensor, pixel_weights: torch.Tensor) -> None:
        """features (K, C, h, w), labels and pixel_weights (K, 1, H, W)."""
        k = features.shape[0]
        self.samples[:k] = features.detach()
        w = self.host_weights
        w[:k] = 1.0 / k
        w[0] = 2.0 / k
        w[:k] = w[:k] / w[:k].sum()
        self.weights = to_device(w, self.device)
        self.metrics[:k], self.targets[:k] = self._encode(labels, pixel_weights)
        self.size = k

    def insert(self, feature: torch.Tensor, label: torch.Tensor, pixel_weight: torch.Tensor) -> None:
        """Insert one sample: feature (1, C, h, w), label and pixel_weight (1, 1, H, W)."""
        slot = self._update_weights()
        self.samples[slot] = feature.detach()[0]
        metric, target = self._encode(label, pixel_weight)
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


class LeastSquaresProblem:
    """Weighted least squares over the memory's active samples (sample weight > 0):
    ‖sqrt(sample weight) · w ⊙ (resize(net(x), label size) − y)‖² + Σ_i ‖reg_i · θ_i‖²,
    the data term in the score-resolution form of `UpsamplingMetric`."""

    def __init__(self, memory: SampleMemory, net: Callable[[torch.Tensor], torch.Tensor],
                 regs: Sequence[float], precond: Sequence[float]):
        self.memory = memory
        self.net = net
        self.regs = list(regs)
        self.precond = list(precond)
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

    def normal_equations(self, params: list[torch.Tensor]):
        """Gauss-Newton system at `params`: (b, A) with b = −Jᵀ(M s − g, reg θ) and
        A(v) = JᵀMJ v + reg² v, J the Jacobian of the scores. Generic version by autograd:
        Jᵀu as a function of u (built with a graph) gives Jv by differentiating w.r.t. u."""
        for p in params:
            p.requires_grad_(True)
        outputs = [self.net(self.x)] + [r * p for r, p in zip(self.regs, params)]
        u = [o.detach().requires_grad_(True) for o in outputs]
        jtu = torch.autograd.grad(outputs, params, u, create_graph=True)
        direction = [UpsamplingMetric.apply(self.metric, outputs[0].detach()) - self.target] + \
            [o.detach() for o in outputs[1:]]
        b = [-t for t in torch.autograd.grad(outputs, params, direction, retain_graph=True)]

        def normal_op(v: list[torch.Tensor]) -> list[torch.Tensor]:
            jv = list(torch.autograd.grad(jtu, u, v, retain_graph=True))
            jv[0] = UpsamplingMetric.apply(self.metric, jv[0])
            return list(torch.autograd.grad(outputs, params, jv, retain_graph=True))

        return b, normal_op


class FilterProblem(LeastSquaresProblem):
    """The update problem: scores linear in the filter weights (net = the ScoreFilter), so J
    and Jᵀ are written out (a filtering and a correlation, both one GEMM) instead of autograd."""

    def normal_equations(self, params: list[torch.Tensor]):
        (weight,) = params
        (reg,) = self.regs
        x = self.x
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)

        def jacobian(v: torch.Tensor) -> torch.Tensor:  # filter weights (1, C, 3, 3) -> scores
            return ScoreFilter.filter(pixels, v, (n, h, w))

        def jacobian_t(s: torch.Tensor) -> torch.Tensor:  # scores (N, 1, h, w) -> weights
            sp = F.pad(s, (1, 1, 1, 1))
            shifted = torch.stack([sp[:, 0, 2 - i:2 - i + h, 2 - j:2 - j + w] for i in range(3) for j in range(3)])
            return (shifted.reshape(9, -1) @ pixels).t().reshape(1, c, 3, 3)

        with torch.no_grad():
            scores = jacobian(weight)
            b = [-(jacobian_t(UpsamplingMetric.apply(self.metric, scores) - self.target) + reg * (reg * weight))]

        def normal_op(v: list[torch.Tensor]) -> list[torch.Tensor]:
            with torch.no_grad():
                return [jacobian_t(UpsamplingMetric.apply(self.metric, jacobian(v[0]))) + reg * (reg * v[0])]

        return b, normal_op


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inner product over a list of tensors (summed per tensor, then over tensors)."""
    total = a[0].reshape(-1) @ b[0].reshape(-1)
    for x, y in zip(a[1:], b[1:]):
        total = total + x.reshape(-1) @ y.reshape(-1)
    return total


class GaussNewtonCG:
    """Gauss-Newton steps, each solving JᵀMJ δ = −Jᵀ(M s − g) (regularization included) by
    preconditioned conjugate gradient (Polak-Ribière, β ≥ 0), as FRTM's optimizer. The CG
    direction and ρ persist across runs; ρ is divided by `forget_factor` at the start of each
    CG run so old directions fade."""

    def __init__(self, problem: LeastSquaresProblem, params: list[torch.Tensor], forget_factor: float):
        self.problem = problem
        self.params = params
        self.forget_factor = forget_factor
        self.direction: list[torch.Tensor] | None = None
        self.rho: torch.Tensor | None = None
        self.r_prev: list[torch.Tensor] | None = None

    def run(self, cg_iters: Sequence[int]) -> None:
        """One GN step per entry of cg_iters, with that many CG iterations."""
        self.problem.select_samples()
        if len(cg_iters) == 0:
            return
        with torch.enable_grad():
            for n in cg_iters:
                self._gauss_newton_step(n)
        for p in self.params:
            p.requires_grad_(False)

    def _gauss_newton_step(self, cg_iters: int) -> None:
        b, normal_op = self.problem.normal_equations(self.params)
        step = self._conjugate_gradient(b, normal_op, cg_iters)
        with torch.no_grad():
            for p, d in zip(self.params, step):
                p.requires_grad_(False)
                p += d

    def _conjugate_gradient(self, b, normal_op, iters: int) -> list[torch.Tensor]:
        if self.forget_factor == 0:
            self.direction, self.rho, self.r_prev = None, None, None
        elif self.direction is not None:
            self.rho = self.rho / self.forget_factor
        r = b
        x = None
        for i in range(iters):
            z = [ri / pc for ri, pc in zip(r, self.problem.precond)]
            rho_prev = self.rho
            self.rho = _dot(r, z)
            if self.direction is None:
                self.direction = z
            else:
                beta = ((self.rho - _dot(self.r_prev, z)) / rho_prev).clamp(min=0)
                self.direction = [zi + di * beta for zi, di in zip(z, self.direction)]
            q = normal_op(self.direction)
            alpha = self.rho / _dot(self.direction, q)
            self.r_prev = r
            if x is None:
                x = [d * alpha for d in self.direction]
            else:
                x = [xi + d * alpha for xi, d in zip(x, self.direction)]
            if i < iters - 1:
                r = [ri - qi * alpha for ri, qi in zip(r, q)]
        return x if x is not None else [torch.zeros_like(t) for t in b]


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
        """pixels (N*h*w, C) (channels-last features, a free view), weight (1, C, 3, 3) -> (N, 1, h, w)."""
        n, h, w = shape
        c = pixels.shape[1]
        taps = (weight[0].reshape(c, 9).t() @ pixels.t()).view(9, n, h, w).permute(1, 0, 2, 3)
        taps = F.pad(taps, (1, 1, 1, 1))
        out = taps[:, 0:1, 0:h, 0:w]
        for k in range(1, 9):
            i, j = divmod(k, 3)
            out = out + taps[:, k:k + 1, i:i + h, j:j + w]
        return out


class TargetModel(nn.Module):
    """Per-object target model: score = filter(project(layer4)) at stride 16."""

    def __init__(self, in_channels: int, config: TargetModelConfig, device: torch.device | str = "cpu",
                 seed: int = 0):
        super().__init__()
        self.config = config
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
        with full_fp32(self.device):
            self._initialize(features.float(), masks.float())

    def _initialize(self, features: torch.Tensor, masks: torch.Tensor) -> None:
        cfg = self.config
        device = features.device
        pw = pixel_weights(masks, cfg.pixel_weighting, cfg.target_fraction)

        # Project and filter together on the raw features.
        memory = SampleMemory(masks.shape[0], features.shape[-3:], masks.shape[-2:], device, cfg.learning_rate)
        memory.initialize(features, masks, pw)
        problem = LeastSquaresProblem(memory, lambda x: self.filter(self.project(x)), cfg.filter_reg, cfg.precond)
        GaussNewtonCG(problem, [self.project.weight, self.filter.weight], self.forget_factor).run(cfg.init_iters)

        # Re-project the samples and keep them; from now on only the filter is optimized.
        with torch.no_grad():
            projected = self.project(features)
        self.memory = SampleMemory(cfg.memory_size, projected.shape[-3:], masks.shape[-2:], device, cfg.learning_rate)
        self.memory.initialize(projected, masks, pw)
        problem = FilterProblem(self.memory, self.filter, cfg.filter_reg[1:], cfg.precond[1:])
        self.update_optimizer = GaussNewtonCG(problem, [self.filter.weight], self.forget_factor)
        self.update_optimizer.run(cfg.update_iters)

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
            self.current_sample = self.project(layer4.float())
            return self.filter(self.current_sample)

    def update(self, soft_mask: torch.Tensor, enough_foreground: bool | None = None) -> None:
        """After a computed frame: store (last sample, soft mask (1, 1, H, W)) and every
        `train_skipping`-th application re-optimize the filter. `enough_foreground`: the
        config's `enough_foreground(soft_mask)` already fetched by the caller (else fetched
        here, which waits on the device)."""
        cfg = self.config
        if self.current_sample is None or self.memory is None:
            return
        if enough_foreground is None:
            enough_foreground = bool(cfg.enough_foreground(soft_mask)[0])
        if not enough_foreground:
            return
        with full_fp32(self.device):
            soft_mask = soft_mask.float()
            pw = pixel_weights((soft_mask > 0.5).float(), cfg.pixel_weighting, cfg.target_fraction)
            self.memory.insert(self.current_sample, soft_mask, pw)
            if self.applications % cfg.train_skipping != 0:
                return
            self.update_optimizer.run(cfg.update_iters)
