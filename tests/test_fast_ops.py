"""The speed-ups are the same functions as the plain PyTorch ops they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.backbone import Backbone
from models.network import Upsampler, upsample2x_bicubic
from models.target_model import (FilterProblem, LeastSquaresProblem, SampleMemory, ScoreFilter,
                                 UpsamplingMetric)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (1, 2, 30, 54)])
def test_separable_bicubic_equals_interpolate(shape):
    x = torch.randn(*shape)
    expected = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    torch.testing.assert_close(upsample2x_bicubic(x), expected, atol=2e-6, rtol=0)


def test_upsampler_equals_plain_composition():
    torch.manual_seed(0)
    up = Upsampler().eval()
    x = torch.randn(2, 64, 15, 27)
    for size in [(120, 216), (118, 213)]:  # exact multiple and a final bilinear resize
        h = F.relu(up.conv1(F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)))
        h = F.interpolate(h, scale_factor=2, mode="bicubic", align_corners=False)
        expected = up.conv2(F.interpolate(h, size, mode="bilinear", align_corners=False))
        torch.testing.assert_close(up(x, size), expected, atol=1e-5, rtol=1e-4)


def test_score_filter_equals_conv():
    torch.manual_seed(0)
    f = ScoreFilter(8)
    x = torch.randn(3, 8, 6, 9)
    torch.testing.assert_close(f(x), F.conv2d(x, f.weight, padding=1), atol=1e-5, rtol=1e-5)


def test_upsampling_metric_equals_full_resolution_loss():
    """sᵀMs − 2 sᵀg + yᵀDy equals ‖w ⊙ (U s − y)‖² computed at label resolution."""
    torch.manual_seed(0)
    s = torch.randn(2, 1, 5, 7)
    y = torch.rand(2, 1, 37, 50)
    w = torch.rand(2, 1, 37, 50) + 0.5
    metric = UpsamplingMetric((5, 7), (37, 50), "cpu")
    m = metric.metric(w * w)
    g = metric.adjoint(w * w * y)
    full = ((w * (F.interpolate(s, (37, 50), mode="bilinear", align_corners=False) - y)) ** 2).sum()
    low = (s * UpsamplingMetric.apply(m, s)).sum() - 2 * (s * g).sum() + (w * w * y * y).sum()
    torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-4)


def test_explicit_filter_jacobians_equal_autograd():
    torch.manual_seed(0)
    f = ScoreFilter(6)
    memory = SampleMemory(4, (6, 5, 7), (20, 28), "cpu", 0.1)
    memory.initialize(torch.randn(3, 6, 5, 7), (torch.rand(3, 1, 20, 28) > 0.5).float(), torch.rand(3, 1, 20, 28))
    v = [torch.randn(1, 6, 3, 3)]
    results = []
    for cls in (LeastSquaresProblem, FilterProblem):
        problem = cls(memory, f, [0.1], [1.0])
        problem.select_samples()
        b, op = problem.normal_equations([f.weight])
        results.append((b[0].detach(), op(v)[0].detach()))
        f.weight.requires_grad_(False)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)


def test_fused_channels_last_backbone_equals_plain():
    x = torch.randint(0, 255, (1, 3, 64, 96), dtype=torch.uint8)
    plain = Backbone("resnet18", "random", seed=0)
    fast = Backbone("resnet18", "random", seed=0).use_channels_last().fuse_batch_norm()
    with torch.no_grad():
        a, b = plain(x), fast(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)
