"""The learnable part of G-FRTM: template matching, reuse gate, delta generator, decoder,
refine-translator and upsampler (Park et al., CVPR 2021; docs/architecture.md maps the names).

One network, one forward path: training (`trainers/`) and inference (`models/tracker.py`) are
both built from the step methods of `GFRTM`. Shapes use B for the number of object samples,
H8/W8, H16/W16, ... for the feature-map sizes at stride 8, 16, ...
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Decoder levels deep to shallow. The deep stages produce the decoder state x16 that the
# refine-translator moves from frame to frame; the shallow stages run on every frame.
DEEP_LEVELS = ("layer5", "layer4")
SHALLOW_LEVELS = ("layer3", "layer2")
DECODER_LEVELS = DEEP_LEVELS + SHALLOW_LEVELS

# Backbone channels per level (torchvision ResNet-18 / ResNet-101).
BACKBONE_CHANNELS = {
    "resnet18": {"layer1": 64, "layer2": 64, "layer3": 128, "layer4": 256, "layer5": 512},
    "resnet101": {"layer1": 64, "layer2": 256, "layer3": 512, "layer4": 1024, "layer5": 2048},
}

DECODER_CHANNELS = 64
MATCHING_CHANNELS = 64  # key = value = feature channels of template matching
GROUP_SIZE = 4  # grouped convs use channels / 4 groups


def resize(t: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (B, C, H, W) to `size`; identity when equal.
    Keeps the dtype (CPU autocast computes it in fp32)."""
    size = tuple(int(s) for s in size)
    if tuple(t.shape[-2:]) == size:
        return t
    return F.interpolate(t, size, mode="bilinear", align_corners=False).to(t.dtype)


# Bicubic (a = -0.75) weights of the four taps for an output half a pixel step past / before
# an input pixel: what x2 upsampling with align_corners=False needs.
_CUBIC_ODD = (-0.10546875, 0.87890625, 0.26171875, -0.03515625)  # taps i-1 .. i+2 for output 2i+1
_CUBIC_EVEN = _CUBIC_ODD[::-1]  # taps i-2 .. i+1 for output 2i


def _upsample2x_cubic(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x2 bicubic along `dim` (-1 or -2) as weighted sums of shifted slices (replicated borders)."""
    n = x.shape[dim]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    xp = torch.cat([first, first, x, last, last], dim=dim)
    even = xp.narrow(dim, 0, n) * _CUBIC_EVEN[0]
    odd = xp.narrow(dim, 1, n) * _CUBIC_ODD[0]
    for k in range(1, 4):
        even.add_(xp.narrow(dim, k, n), alpha=_CUBIC_EVEN[k])
        odd.add_(xp.narrow(dim, k + 1, n), alpha=_CUBIC_ODD[k])
    return torch.stack([even, odd], dim=dim).flatten(dim - 1, dim) if dim == -1 \
        else torch.stack([even, odd], dim=-2).flatten(-3, -2)


def upsample2x_bicubic(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W), equal to F.interpolate(x, scale_factor=2, mode="bicubic",
    align_corners=False) (FRTM's pyramid-up filter) up to rounding, computed separably (faster on CPU)."""
    return _upsample2x_cubic(_upsample2x_cubic(x, -1), -2)


def adaptive_max_pool2d_bins(x: torch.Tensor, size: int) -> torch.Tensor:
    """F.adaptive_max_pool2d(x, size) written out bin by bin (bin i of n covers floor(i n / size)
    to ceil((i + 1) n / size)), for export: ONNX has no adaptive pooling over a dynamic size."""
    def pool(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        # ceil as ((i + 1) n + size - 1) // size: an exported integer division truncates, so no negative operands
        return torch.cat([t.narrow(dim, i * n // size, ((i + 1) * n + size - 1) // size - i * n // size)
                          .amax(dim, keepdim=True) for i in range(size)], dim=dim)
    return pool(pool(x, -2), -1)


def same_format(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` in the memory format (channels-last or not) of `like`: torch.cat with a one-channel
    tensor can fall back to NCHW, and a 65-channel conv is much slower that way on CPU."""
    if like.dim() == 4 and like.shape[1] > 1 and like.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def per_sample(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows of per-frame tensors t (F, ...) for the samples, `rows` (B,) the frame of each
    sample; t itself without `rows` (batch 1, shared by all samples, or one row per sample)."""
    return t if rows is None else t.index_select(0, rows)


def conv(ic: int, oc: int, ksize: int, bias: bool = True, groups: int = 1) -> nn.Conv2d:
    """'Same' convolution (stride 1, padding ksize // 2)."""
    return nn.Conv2d(ic, oc, ksize, padding=ksize // 2, bias=bias, groups=groups)


# ---------------------------------------------------------------------------------------------
# Template matching (Park et al., CVPR 2021)
# ---------------------------------------------------------------------------------------------

class TemplateMatching(nn.Module):
    """First-frame template of an object and its matching against later frames.

    Input channels are C_layer3 + 1 (features and a mask / score map at stride 8).
    """

    def __init__(self, in_channels: int, channels: int = MATCHING_CHANNELS):
        super().__init__()
        c = channels
        g = c // GROUP_SIZE
        # Template generation: 1x1 -> LeakyReLU -> 5x5 grouped, for values and keys.
        self.template_value = nn.Sequential(conv(in_channels, c, 1), nn.LeakyReLU(0.2), conv(c, c, 5, groups=g))
        self.template_key = nn.Sequential(conv(in_channels, c, 1), nn.LeakyReLU(0.2), conv(c, c, 5, groups=g))
        # Matching: 1x1 -> 5x5 grouped -> LeakyReLU, for keys and features, then a blend.
        self.key = nn.Sequential(conv(in_channels, c, 1), conv(c, c, 5, groups=g), nn.LeakyReLU(0.2))
        self.feature = nn.Sequential(conv(in_channels, c, 1), conv(c, c, 5, groups=g), nn.LeakyReLU(0.2))
        self.blend = nn.Sequential(conv(2 * c, 2 * c, 5, groups=2 * c // GROUP_SIZE), conv(2 * c, c, 1))

    def make_template(self, layer3: torch.Tensor, mask8: torch.Tensor) -> torch.Tensor:
        """layer3 (B, C3, H8, W8), mask8 (B, 1, H8, W8) -> template T (B, 64, 64)."""
        x = torch.cat([layer3, mask8.to(layer3.dtype)], dim=1)
        value = self.template_value(x).flatten(2)  # B, V, HW
        key = self.template_key(x).flatten(2)  # B, K, HW
        hw = value.shape[-1]
        # exported, hw is a dynamic axis: its square root as a tensor op (ONNX has none for sizes)
        scale = torch.full((), hw, dtype=torch.float32).sqrt() if torch.compiler.is_exporting() else math.sqrt(hw)
        return torch.softmax(torch.bmm(value, key.transpose(1, 2)) / scale, dim=2)

    def match(self, layer3: torch.Tensor, score8: torch.Tensor, template: torch.Tensor,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """layer3 (1 or B, C3, H8, W8), or (F, ...) with `rows` (B,) each sample's row of it;
        score8 (B, 1, H8, W8), template (B, 64, 64) -> M (B, 64, H8, W8)."""
        b = score8.shape[0]
        x = torch.cat([per_sample(layer3, rows).expand(b, -1, -1, -1), score8.to(layer3.dtype)], dim=1)
        key = self.key(x)
        feature = self.feature(x)
        h, w = key.shape[-2:]
        similarity = torch.bmm(template, key.flatten(2)).view(b, -1, h, w)
        return F.relu(self.blend(torch.cat([feature, similarity], dim=1)))


class ReuseGate(nn.Module):
    """Reuse gate on the matching output M: 2 logits, index 0 = reuse, index 1 = compute."""

    def __init__(self, channels: int = MATCHING_CHANNELS):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 2, 3, stride=2, padding=0)

    def forward(self, matched: torch.Tensor) -> torch.Tensor:
        """matched (B, 64, H8, W8) -> logits (B, 2)."""
        pool = adaptive_max_pool2d_bins if torch.compiler.is_exporting() else F.adaptive_max_pool2d
        x = pool(matched, 7)
        x = self.norm(self.conv1(x))
        x = pool(x, 3)
        return self.conv2(x).flatten(1)


class DeltaGenerator(nn.Module):
    """Score change Δ at stride 16 from the matching output M."""

    def __init__(self, channels: int = MATCHING_CHANNELS):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, stride=2, padding=1)

    def forward(self, matched: torch.Tensor) -> torch.Tensor:
        """matched (B, 64, H8, W8) -> Δ (B, 1, H16, W16)."""
        return self.conv(matched)


# ---------------------------------------------------------------------------------------------
# Decoder (FRTM refinement network, Robinson et al., CVPR 2020), refine-translator and upsampler
# (Park et al., CVPR 2021)
# ---------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """FRTM's RRB: 1x1 conv, then relu(h + conv3 -> BN -> ReLU -> conv3 (h))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1x1 = conv(channels, channels, 1)
        self.bblock = nn.Sequential(conv(channels, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(),
                                    conv(channels, channels, 3, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1x1(x)
        return F.relu(h + self.bblock(h))


class FeatureTransform(nn.Module):
    """FRTM's TSE: reduce the backbone features, concatenate the score map, transform."""

    def __init__(self, feature_channels: int, channels: int = DECODER_CHANNELS):
        super().__init__()
        n = channels + 1
        self.reduce = nn.Sequential(conv(feature_channels, channels, 1), nn.ReLU(), conv(channels, channels, 1))
        self.transform = nn.Sequential(conv(n, n, 3), nn.ReLU(), conv(n, n, 3), nn.ReLU(),
                                       conv(n, channels, 3), nn.ReLU())


class ChannelAttention(nn.Module):
    """FRTM's CAB: mix the deeper state into the current level with channel attention."""

    def __init__(self, channels: int, deepest: bool):
        super().__init__()
        self.convreluconv = nn.Sequential(conv(2 * channels, channels, 1), nn.ReLU(), conv(channels, channels, 1))
        self.deepest = deepest

    def forward(self, deeper: torch.Tensor, shallower: torch.Tensor) -> torch.Tensor:
        shallow_pool = F.adaptive_avg_pool2d(shallower, 1)
        deeper_pool = deeper if self.deepest else F.adaptive_avg_pool2d(deeper, 1)
        if deeper_pool.shape[0] != shallow_pool.shape[0]:
            deeper_pool = deeper_pool.expand(shallow_pool.shape[0], -1, -1, -1)
        attention = torch.sigmoid(self.convreluconv(torch.cat([shallow_pool, deeper_pool], dim=1)))
        return shallower * attention + resize(deeper, shallower.shape[-2:])


class Decoder(nn.Module):
    """FRTM's refinement decoder over the levels layer5, layer4 (deep) and layer3, layer2 (shallow)."""

    def __init__(self, feature_channels: Mapping[str, int], channels: int = DECODER_CHANNELS):
        super().__init__()
        self.TSE = nn.ModuleDict({L: FeatureTransform(feature_channels[L], channels) for L in DECODER_LEVELS})
        self.RRB1 = nn.ModuleDict({L: ResidualBlock(channels) for L in DECODER_LEVELS})
        self.CAB = nn.ModuleDict({L: ChannelAttention(channels, L == "layer5") for L in DECODER_LEVELS})
        self.RRB2 = nn.ModuleDict({L: ResidualBlock(channels) for L in DECODER_LEVELS})

    def stage(self, level: str, feature: torch.Tensor, score: torch.Tensor,
              x: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder level.

        feature (1 or B, C_L, H_L, W_L): backbone features, shared by all objects when batch 1;
        or (F, ...), the features of F frames, with rows (B,) each object's frame;
        score (B, 1, h, w): score map at any stride, resized to the level;
        x (B, 64, h', w') or None: state from the deeper level (None at layer5).
        Returns the new state (B, 64, H_L, W_L).
        """
        tse = self.TSE[level]
        h = per_sample(tse.reduce(feature), rows)  # reduced once per frame, shared by its objects
        pooled = F.adaptive_avg_pool2d(h, 1) if x is None else x
        b = score.shape[0]
        # the score joins in the features' dtype (fp32 scores would promote the concatenation)
        h = same_format(torch.cat([h.expand(b, -1, -1, -1), resize(score, h.shape[-2:]).to(h.dtype)], dim=1), feature)
        h = self.RRB1[level](tse.transform(h))
        h = self.CAB[level](pooled, h)
        return self.RRB2[level](h)

    def deep(self, features: Mapping[str, torch.Tensor], score: torch.Tensor,
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """Deep stages (layer5, layer4) -> decoder state x16 (B, 64, H16, W16)."""
        x = None
        for level in DEEP_LEVELS:
            x = self.stage(level, features[level], score, x, rows)
        return x

    def shallow(self, features: Mapping[str, torch.Tensor], score: torch.Tensor,
                x16: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Shallow stages (layer3, layer2) from x16 -> state at stride 4 (B, 64, H4, W4)."""
        x = x16
        for level in SHALLOW_LEVELS:
            x = self.stage(level, features[level], score, x, rows)
        return x


class MultiReceptiveConv(nn.Module):
    """Three 3x3 convs at dilation 1, 2, 3 on the same input, blended by a 5x5 conv."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int):
        super().__init__()
        self.dilation1 = nn.Conv2d(in_channels, mid_channels, 3, padding=1, dilation=1)
        self.dilation2 = nn.Conv2d(in_channels, mid_channels, 3, padding=2, dilation=2)
        self.dilation3 = nn.Conv2d(in_channels, mid_channels, 3, padding=3, dilation=3)
        self.blend = nn.Conv2d(3 * mid_channels, out_channels, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blend(torch.cat([self.dilation1(x), self.dilation2(x), self.dilation3(x)], dim=1))


class RefineTranslator(nn.Module):
    """Moves the previous decoder state x16 to the current frame, guided by Δ."""

    def __init__(self, channels: int = DECODER_CHANNELS):
        super().__init__()
        self.multi_receptive = MultiReceptiveConv(channels + 1, 48, channels)
        self.residual = ResidualBlock(channels)

    def forward(self, x16: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x16 (B, 64, H16, W16), delta (B, 1, H16, W16) -> translated state (B, 64, H16, W16)."""
        return self.residual(self.multi_receptive(torch.cat([x16, delta], dim=1)))


class Upsampler(nn.Module):
    """Decoder output at stride 4 -> mask logits at image size."""

    def __init__(self, channels: int = DECODER_CHANNELS):
        super().__init__()
        self.conv1 = conv(channels, channels // 2, 3)
        self.conv2 = conv(channels // 2, 1, 3)

    def forward(self, x: torch.Tensor, image_size) -> torch.Tensor:
        """x (B, 64, H4, W4) -> logits (B, 1, H, W).

        Computes conv2(resize(bicubic_x2(relu(conv1(bicubic_x2(x)))))). conv2 has one output
        channel, so its channel mixing is done first, per kernel tap, at half resolution: the
        resampling acts on 9 tap maps instead of 32 channels, and the full-resolution conv
        becomes a sum of 9 shifted maps. Mathematically identical; about 4x cheaper at 480p.
        """
        x = F.relu(self.conv1(upsample2x_bicubic(x)))
        # The one-channel tail (tap mixing, resampling, the 9-map sum at full resolution) runs in
        # fp32 even under autocast: cheap next to conv1, and the logits keep fp32 resolution.
        with torch.autocast(x.device.type, enabled=False):
            w = self.conv2.weight.float()  # (1, C, 3, 3)
            taps = F.conv2d(x.float(), w[0].permute(1, 2, 0).reshape(9, -1, 1, 1))  # (B, 9, H2, W2), tap 3i + j
            taps = F.pad(resize(upsample2x_bicubic(taps), image_size[-2:]), (1, 1, 1, 1))
            h, w_ = image_size[-2:]
            out = taps[:, 0:1, 0:h, 0:w_] + self.conv2.bias.float().view(1, 1, 1, 1)
            for k in range(1, 9):
                i, j = divmod(k, 3)
                out = out + taps[:, k:k + 1, i:i + h, j:j + w_]
        return out


# ---------------------------------------------------------------------------------------------
# The whole learnable network
# ---------------------------------------------------------------------------------------------

class GFRTM(nn.Module):
    """Learnable modules of G-FRTM with the step methods both training and tracking use.

    The backbone and the per-object target models live outside (they are frozen / online).
    `with_gate=False` builds plain FRTM (decoder and upsampler only), for FRTM checkpoints.
    """

    def __init__(self, backbone: str = "resnet18", with_gate: bool = True):
        super().__init__()
        if backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"unknown backbone {backbone!r}: use one of {sorted(BACKBONE_CHANNELS)} (--ftext)")
        self.backbone_name = backbone
        self.has_gate = with_gate
        channels = BACKBONE_CHANNELS[backbone]
        if with_gate:
            self.template_matching = TemplateMatching(channels["layer3"] + 1)
            self.reuse_gate = ReuseGate()
            self.delta_generator = DeltaGenerator()
            self.refine_translator = RefineTranslator()
        self.decoder = Decoder(channels)
        self.upsampler = Upsampler()

    # Step methods -----------------------------------------------------------------------------

    def make_template(self, layer3: torch.Tensor, mask8: torch.Tensor) -> torch.Tensor:
        """(B, C3, H8, W8), (B, 1, H8, W8) -> template (B, 64, 64)."""
        return self.template_matching.make_template(layer3, mask8)

    def match(self, layer3: torch.Tensor, score8: torch.Tensor, template: torch.Tensor,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """Template matching -> M (B, 64, H8, W8); `rows`: see `TemplateMatching.match`."""
        return self.template_matching.match(layer3, score8, template, rows)

    def gate_logits(self, matched: torch.Tensor) -> torch.Tensor:
        """M (B, 64, H8, W8) -> reuse gate logits (B, 2), index 0 = reuse."""
        return self.reuse_gate(matched)

    def delta(self, matched: torch.Tensor) -> torch.Tensor:
        """M (B, 64, H8, W8) -> Δ (B, 1, H16, W16)."""
        return self.delta_generator(matched)

    def deep_stages(self, features: Mapping[str, torch.Tensor], score: torch.Tensor,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder deep stages -> x16 (B, 64, H16, W16); `rows`: see `Decoder.stage`."""
        return self.decoder.deep(features, score, rows)

    def shallow_stages(self, features: Mapping[str, torch.Tensor], score: torch.Tensor,
                       x16: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder shallow stages -> (B, 64, H4, W4)."""
        return self.decoder.shallow(features, score, x16, rows)

    def translate(self, x16: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Refine-translator: previous x16 and Δ -> x16 for the current frame."""
        return self.refine_translator(x16, delta)

    def upsample(self, x: torch.Tensor, image_size) -> torch.Tensor:
        """(B, 64, H4, W4) -> mask logits (B, 1, H, W)."""
        return self.upsampler(x, image_size)

    # Compositions of the steps ----------------------------------------------------------------

    def decode_computed(self, features: Mapping[str, torch.Tensor], score: torch.Tensor, image_size,
                        rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate 0: full decoder with the target-model score -> (logits, new x16). `rows`: each
        object's frame when the features are those of several frames (`Decoder.stage`)."""
        x16 = self.deep_stages(features, score, rows)
        return self.upsample(self.shallow_stages(features, score, x16, rows), image_size), x16

    def decode_reused(self, features: Mapping[str, torch.Tensor], score: torch.Tensor, x16_prev: torch.Tensor,
                      delta: torch.Tensor, image_size,
                      rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate 1: translate the previous x16, shallow stages with score = prev score + Δ ->
        (logits, next x16). The state carried to the next frame is x16_prev itself: only a
        computed frame renews it (upstream), the translated state serves this frame alone."""
        x16 = self.translate(x16_prev, delta)
        return self.upsample(self.shallow_stages(features, score, x16, rows), image_size), x16_prev

    def decode_training(self, features: Mapping[str, torch.Tensor], score: torch.Tensor,
                        deep_score: torch.Tensor, gate: torch.Tensor, x16_prev: torch.Tensor,
                        delta: torch.Tensor, image_size) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time decoder, the gate mixing both paths differentiably (upstream's training path).

        features: per-sample features (B, ...); score (B, 1, H16, W16) for the shallow stages;
        deep_score (B, 1, H16, W16) for the deep stages; gate (B, 1), 1 = reuse; x16_prev, delta.
        Returns (logits (B, 1, H, W), next x16_prev). Upstream carries the state forward as
        x16_prev where the gate computed and the fresh deep state where it reused; kept as is
        because the released weights were trained that way (see docs/upstream.md).
        """
        x16 = self.deep_stages(features, deep_score)
        g = gate.view(-1, 1, 1, 1)
        mixed = self.translate(x16_prev, delta) * g + x16 * (1 - g)
        logits = self.upsample(self.shallow_stages(features, score, mixed), image_size)
        next_x16 = x16_prev * (1 - g) + x16 * g
        return logits, next_x16
