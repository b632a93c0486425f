"""FRTM's target model: a per-object 2-layer conv optimized online by Gauss-Newton with
conjugate-gradient inner loops on a weighted least-squares loss (SPEC §3).

Shapes: K samples, C_in = layer4 channels, c = projection channels, (h, w) the stride-16
feature size, (H, W) the label (image) size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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

    def with_(self, **changes) -> "TargetModelConfig":
        return replace(self, **changes)


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


class SampleMemory:
    """Training samples of a target model with FRTM's sample weighting.

    The first sample gets weight 2/K, the others 1/K (normalized). A new sample replaces the
    lowest-weight slot and gets its weight from the learning rate.
    """

    def __init__(self, capacity: int, feature_shape: Sequence[int], label_shape: Sequence[int],
                 device: torch.device | str, learning_rate: float):
        self.samples = torch.zeros(capacity, *feature_shape, device=device)
        self.weights = torch.zeros(capacity, device=device)
        self.labels = torch.zeros(capacity, *label_shape, device=device)
        self.pixel_weights = torch.zeros(capacity, *label_shape, device=device)
        self.capacity = capacity
        self.size = 0
        self.learning_rate = learning_rate
        self._last_slot: int | None = None

    def initialize(self, features: torch.Tensor, labels: torch.Tensor, pixel_weights: torch.Tensor) -> None:
        """features (K, C, h, w), labels and pixel_weights (K, 1, H, W)."""
        k = features.shape[0]
        self.samples[:k] = features.detach()
        self.weights[:k] = 1.0 / k
        self.weights[0] = 2.0 / k
        self.weights[:k] = self.weights[:k] / self.weights[:k].sum()
        self.labels[:k] = labels.float()
        self.pixel_weights[:k] = pixel_weights
        self.size = k

    def insert(self, feature: torch.Tensor, label: torch.Tensor, pixel_weight: torch.Tensor) -> None:
        """Insert one sample: feature (1, C, h, w), label and pixel_weight (1, 1, H, W)."""
        slot = self._update_weights()
        self.samples[slot] = feature.detach()
        self.labels[slot] = label
        self.pixel_weights[slot] = pixel_weight
        self.size = min(self.size + 1, self.capacity)
        self._last_slot = slot

    def _update_weights(self) -> int:
        w = self.weights
        lr = self.learning_rate
        if self.size == 0 or lr == 1:
            w[:] = 0
            w[0] = 1
            slot = 0
        else:
            slot = int(torch.argmin(w).item())
            if self._last_slot is None:
                w /= 1 - lr
                w[slot] = lr
            else:
                # As upstream: the new weight derives from the previous insert's weight and the
                # old weights are not decayed again before renormalizing.
                w[slot] = w[self._last_slot] / (1 - lr)
        w /= w.sum()
        return slot


class LeastSquaresProblem:
    """Weighted least squares over the memory's active samples:
    residuals = [w ⊙ (resize(net(x), label size) − y), reg_i · θ_i ...]."""

    def __init__(self, memory: SampleMemory, net: Callable[[torch.Tensor], torch.Tensor],
                 regs: Sequence[float], precond: Sequence[float]):
        self.memory = memory
        self.net = net
        self.regs = list(regs)
        self.precond = list(precond)
        self.x = self.y = self.w = None

    def select_samples(self) -> None:
        """Take the samples with positive weight; sqrt(sample weight) scales their residuals."""
        m = self.memory
        active = m.weights > 0
        self.x = m.samples[active]
        self.y = m.labels[active]
        self.w = m.pixel_weights[active] * m.weights[active].sqrt().view(-1, 1, 1, 1)

    def residuals(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        s = self.net(self.x)
        s = F.interpolate(s, self.y.shape[-2:], mode="bilinear", align_corners=False)
        return [self.w * (s - self.y)] + [r * p for r, p in zip(self.regs, params)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inner product over a list of tensors (summed per tensor, then over tensors)."""
    total = a[0].reshape(-1) @ b[0].reshape(-1)
    for x, y in zip(a[1:], b[1:]):
        total = total + x.reshape(-1) @ y.reshape(-1)
    return total


class GaussNewtonCG:
    """Gauss-Newton steps, each solving J^T J δ = -J^T r by preconditioned conjugate gradient
    (Polak-Ribière, β ≥ 0). The CG direction and ρ persist across runs; ρ is divided by
    `forget_factor` at the start of each CG run so old directions fade."""

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
        for p in self.params:
            p.requires_grad_(True)
        f0 = self.problem.residuals(self.params)
        # J^T g as a function of g (created with graph) gives J v by differentiating w.r.t. g.
        g = [f.detach().requires_grad_(True) for f in f0]
        jtg = torch.autograd.grad(f0, self.params, g, create_graph=True)
        b = [-t.detach() for t in jtg]

        def normal_op(v: list[torch.Tensor]) -> list[torch.Tensor]:
            jv = torch.autograd.grad(jtg, g, v, retain_graph=True)
            return list(torch.autograd.grad(f0, self.params, jv, retain_graph=True))

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
        r = [t.clone() for t in b]
        x = None
        for i in range(iters):
            z = [ri / pc for ri, pc in zip(r, self.problem.precond)]
            rho_prev = self.rho
            self.rho = _dot(r, z)
            if self.direction is None:
                self.direction = [t.clone() for t in z]
            else:
                beta = ((self.rho - _dot(self.r_prev, z)) / rho_prev).clamp(min=0)
                self.direction = [zi + di * beta for zi, di in zip(z, self.direction)]
            q = normal_op(self.direction)
            alpha = self.rho / _dot(self.direction, q)
            self.r_prev = [t.clone() for t in r]
            if x is None:
                x = [d * alpha for d in self.direction]
            else:
                x = [xi + d * alpha for xi, d in zip(x, self.direction)]
            if i < iters - 1:
                r = [ri - qi * alpha for ri, qi in zip(r, q)]
        return x if x is not None else [torch.zeros_like(t) for t in b]


class TargetModel(nn.Module):
    """Per-object target model: score = filter(project(layer4)) at stride 16."""

    def __init__(self, in_channels: int, config: TargetModelConfig, device: torch.device | str = "cpu",
                 seed: int = 0):
        super().__init__()
        self.config = config
        self.project = nn.Conv2d(in_channels, config.channels, 1, bias=False)
        self.filter = nn.Conv2d(config.channels, 1, 3, padding=1, bias=False)
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

    def initialize(self, features: torch.Tensor, masks: torch.Tensor) -> None:
        """Train from the augmented first frame: features (K, C_in, h, w), masks (K, 1, H, W)."""
        cfg = self.config
        device = features.device
        pw = pixel_weights(masks, cfg.pixel_weighting, cfg.target_fraction)

        # Project and filter together on the raw features.
        memory = SampleMemory(masks.shape[0], features.shape[-3:], masks.shape[-3:], device, cfg.learning_rate)
        memory.initialize(features, masks, pw)
        problem = LeastSquaresProblem(memory, lambda x: self.filter(self.project(x)), cfg.filter_reg, cfg.precond)
        GaussNewtonCG(problem, [self.project.weight, self.filter.weight], self.forget_factor).run(cfg.init_iters)

        # Re-project the samples and keep them; from now on only the filter is optimized.
        with torch.no_grad():
            projected = self.project(features)
        self.memory = SampleMemory(cfg.memory_size, projected.shape[-3:], masks.shape[-3:], device, cfg.learning_rate)
        self.memory.initialize(projected, masks, pw)
        problem = LeastSquaresProblem(self.memory, self.filter, cfg.filter_reg[1:], cfg.precond[1:])
        self.update_optimizer = GaussNewtonCG(problem, [self.filter.weight], self.forget_factor)
        self.update_optimizer.run(cfg.update_iters)

    def load_trained(self, state_dict: dict) -> None:
        """Use an already trained (cached) target model; it will not be updated."""
        self.load_state_dict(state_dict, strict=True)
        for p in self.parameters():
            p.requires_grad_(False)

    def apply(self, layer4: torch.Tensor) -> torch.Tensor:
        """layer4 (N, C_in, h, w) -> scores (N, 1, h, w); remembers the projected sample."""
        self.applications += 1
        with torch.no_grad():
            self.current_sample = self.project(layer4)
            return self.filter(self.current_sample)

    def update(self, soft_mask: torch.Tensor) -> None:
        """After a computed frame: store (last sample, soft mask (1, 1, H, W)) and every
        `train_skipping`-th application re-optimize the filter."""
        cfg = self.config
        if self.current_sample is None or self.memory is None:
            return
        if (soft_mask > 0.5).sum() < cfg.min_update_pixels:
            return
        pw = pixel_weights((soft_mask > 0.5).float(), cfg.pixel_weighting, cfg.target_fraction)
        self.memory.insert(self.current_sample, soft_mask, pw)
        if self.applications % cfg.train_skipping != 0:
            return
        self.update_optimizer.run(cfg.update_iters)
