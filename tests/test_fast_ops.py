"""The speed-ups are the same functions as the plain PyTorch ops they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.backbone import Backbone
from models.network import Upsampler, upsample2x_bicubic
from models.target_model import FilterProblem, ProjectFilterProblem, UpsamplingMetric, target_scores


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


def test_target_scores_equal_convolutions():
    """Each row's projection and filter, on a frame of its own or one frame shared by all rows."""
    torch.manual_seed(0)
    n, c_in, c, h, w = 3, 8, 5, 6, 9
    project, filt = torch.randn(n, c, c_in, 1, 1), torch.randn(n, 1, c, 3, 3)
    for frames in (n, 1):
        x = torch.randn(frames, c_in, h, w)
        pixels = x.permute(0, 2, 3, 1).reshape(frames, h * w, c_in)
        z, scores = target_scores(pixels, project.view(n, c, c_in), filt.view(n, c, 9), (h, w))
        for i in range(n):
            projected = F.conv2d(x[i % frames][None], project[i])
            torch.testing.assert_close(z[i], projected[0].permute(1, 2, 0).reshape(h * w, c), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(scores[i:i + 1], F.conv2d(projected, filt[i], padding=1), atol=1e-5, rtol=1e-5)


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


def autograd_normal_equations(net, params, x, metric, target, regs):
    """Reference Gauss-Newton system by autograd (double backward), per parameter:
    b = −Jᵀ(M s − g, reg θ), A(v) = JᵀMJ v + reg² v."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    outputs = [net(x, *params)] + [r * p for r, p in zip(regs, params)]
    u = [o.detach().requires_grad_(True) for o in outputs]
    jtu = torch.autograd.grad(outputs, params, u, create_graph=True)
    residual = [UpsamplingMetric.apply(metric, outputs[0].detach()) - target] + [o.detach() for o in outputs[1:]]
    b = [-t for t in torch.autograd.grad(outputs, params, residual, retain_graph=True)]

    def normal_op(v):
        jv = list(torch.autograd.grad(jtu, u, v, retain_graph=True))
        jv[0] = UpsamplingMetric.apply(metric, jv[0])
        return list(torch.autograd.grad(outputs, params, jv, retain_graph=True))

    return b, normal_op


def test_explicit_filter_jacobians_equal_autograd():
    """The update's written-out J and Jᵀ, two rows at once (the second with an empty, zero-weight
    slot), against autograd per row on its filled slots."""
    torch.manual_seed(0)
    rows, slots, c, h, w = 2, 3, 6, 5, 7
    samples = torch.randn(rows, slots, h * w, c)
    sample_weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]]).view(-1, 1, 1, 1)
    metric, target = torch.rand(rows * slots, 9, h, w) * sample_weights, torch.randn(rows * slots, 1, h, w) * sample_weights
    theta, v = torch.randn(rows, 9 * c), torch.randn(rows, 9 * c)
    problem = FilterProblem(samples, metric, target, 0.1, 1.0)
    b, op = problem.normal_equations(theta)
    av = op(v)
    for i, filled in enumerate((3, 2)):
        x = samples[i, :filled].view(filled, h, w, c).permute(0, 3, 1, 2)
        part = slice(i * slots, i * slots + filled)
        weight = theta[i].view(1, c, 3, 3).clone()
        ref_b, ref_op = autograd_normal_equations(lambda xi, f: F.conv2d(xi, f, padding=1), [weight], x,
                                                  metric[part], target[part], [0.1])
        torch.testing.assert_close(b[i].view(1, c, 3, 3), ref_b[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(av[i].view(1, c, 3, 3), ref_op([v[i].view(1, c, 3, 3)])[0], atol=1e-5, rtol=1e-4)


def test_explicit_project_filter_jacobians_equal_autograd():
    """The initialization's written-out J and Jᵀ, two objects at once, against autograd per object."""
    torch.manual_seed(0)
    o, k, c_in, c, h, w = 2, 3, 10, 4, 5, 7
    x = torch.randn(o, k, c_in, h, w)
    metric = torch.rand(o * k, 9, h, w)
    target = torch.randn(o * k, 1, h, w)
    proj, filt = torch.randn(o, c, c_in, 1, 1), torch.randn(o, 1, c, 3, 3)
    dproj, dfilt = torch.randn(o, c, c_in, 1, 1), torch.randn(o, 1, c, 3, 3)
    regs = [0.1, 0.3]
    problem = ProjectFilterProblem(x, metric, target, c, regs, [1.0, 1.0])

    def flat(p, f):  # θ layout: projection, then the flipped filter taps
        n = p.shape[0]
        return torch.cat([p.reshape(n, -1), f.reshape(n, c, 9).flip(2).transpose(1, 2).reshape(n, -1)], dim=1)

    b, op = problem.normal_equations(flat(proj, filt))
    ab = op(flat(dproj, dfilt))
    net = lambda xi, p, f: F.conv2d(F.conv2d(xi, p), f, padding=1)  # noqa: E731
    for i in range(o):
        rows = slice(i * k, (i + 1) * k)
        ref_b, ref_op = autograd_normal_equations(net, [proj[i], filt[i]], x[i], metric[rows], target[rows], regs)
        torch.testing.assert_close(b[i:i + 1], flat(ref_b[0][None], ref_b[1][None]), atol=1e-3, rtol=1e-4)
        ref_ab = ref_op([dproj[i], dfilt[i]])
        torch.testing.assert_close(ab[i:i + 1], flat(ref_ab[0][None], ref_ab[1][None]), atol=1e-3, rtol=1e-4)


def test_fused_channels_last_backbone_equals_plain():
    x = torch.randint(0, 255, (1, 3, 64, 96), dtype=torch.uint8)
    plain = Backbone("resnet18", "random", seed=0)
    fast = Backbone("resnet18", "random", seed=0).use_channels_last().fuse_batch_norm()
    with torch.no_grad():
        a, b = plain(x), fast(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)
