"""First-frame augmenter (models/augmenter.py): shapes, content, determinism and failure modes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.augmenter import (AugmentationParams, FirstFrameAugmenter, TransformChoices, _blur,
                              _motion_blur_kernel, evaluation_params, training_params)

H, W = 120, 216
RED = torch.tensor([200.0, 30.0, 30.0])


def scene(obj_box=(40, 70, 80, 120)) -> tuple[torch.Tensor, torch.Tensor]:
    """A solid red object on a green-blue textured background: uint8 (3, H, W), uint8 (H, W)."""
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    background = torch.stack([
        torch.full((H, W), 20.0),
        60 + 100 * xx / W + 20 * torch.rand(H, W, generator=g),
        60 + 100 * yy / H + 20 * torch.rand(H, W, generator=g),
    ])
    y0, y1, x0, x1 = obj_box
    mask = torch.zeros(H, W, dtype=torch.uint8)
    mask[y0:y1, x0:x1] = 1
    image = torch.where(mask.bool(), RED.view(3, 1, 1), background)
    return image.round().to(torch.uint8), mask


def erode(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Erode a (H, W) 0/1 mask by `px` pixels (square element), counting outside as background
    (the whole frame is blurred with zero padding, so the image border is dimmed)."""
    inv = F.pad(1 - mask.float()[None, None], (px, px, px, px), value=1.0)
    return (1 - F.max_pool2d(inv, 2 * px + 1, 1))[0, 0]


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    return F.max_pool2d(mask.float()[None, None], 2 * px + 1, 1, px)[0, 0]


def test_upstream_settings():
    ev, tr = evaluation_params(), training_params()
    assert (ev.num_aug, tr.num_aug, ev.min_px_count, tr.min_px_count) == (5, 15, 1, 1)
    assert ev.fg_aug_params.rotation == [5, -5, 10, -10, 20, -20, 30, -30, 45, -45]
    assert ev.fg_aug_params.scale == [0.5, 0.7, 1.0, 1.5, 2.0, 2.5]
    assert ev.bg_aug_params.scale == [1.0, 1.0, 1.2]
    assert ev.bg_aug_params.blur_size == [0.0, 0.0, 1.0, 2.0, 5.0]
    assert evaluation_params(3).num_aug == 3


def test_single_image_is_the_input_and_uses_no_randomness():
    image, mask = scene()
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    images, masks = FirstFrameAugmenter(evaluation_params(1)).augment(image, mask, rng)
    assert images.shape == (1, 3, H, W) and masks.shape == (1, 1, H, W)
    assert images.dtype == torch.float32 and masks.dtype == torch.float32
    assert torch.equal(images[0], image.float())
    assert torch.equal(masks[0, 0], mask.float())
    assert rng.bit_generator.state == state


def check_output(image: torch.Tensor, mask: torch.Tensor, images: torch.Tensor, masks: torch.Tensor, k: int):
    assert images.shape == (k, 3, H, W) and masks.shape == (k, 1, H, W)
    assert images.dtype == torch.float32 and masks.dtype == torch.float32
    assert images.device == image.device and masks.device == image.device
    assert torch.equal(images[0], image.float())
    assert torch.equal(masks[0], mask.float().view(1, H, W))
    assert images.min() >= 0 and images.max() <= 255


def test_shapes_dtypes_and_first_frame():
    image, mask = scene()
    images, masks = FirstFrameAugmenter(evaluation_params()).augment(image, mask)
    check_output(image, mask, images, masks, 5)

    # float image and (1, H, W) mask are accepted as well
    images, masks = FirstFrameAugmenter(evaluation_params(3)).augment(image.float() + 0.25, mask[None].float())
    check_output(image.float() + 0.25, mask, images, masks, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_input_stays_on_cuda():
    image, mask = scene()
    image, mask = image.cuda(), mask.cuda()
    images, masks = FirstFrameAugmenter(evaluation_params()).augment(image, mask)
    check_output(image, mask, images, masks, 5)
    ref_images, ref_masks = FirstFrameAugmenter(evaluation_params()).augment(image.cpu(), mask.cpu())
    assert torch.equal(images.cpu(), ref_images) and torch.equal(masks.cpu(), ref_masks)


def test_object_is_cut_out_and_pasted_where_the_mask_says():
    image, mask = scene()
    images, masks = FirstFrameAugmenter(training_params()).augment(image, mask, np.random.default_rng(7))
    for k in range(1, images.shape[0]):
        im, m = images[k], masks[k, 0]
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert m.sum() > 0
        assert (im - image.float()).abs().mean() > 1.0  # not a copy of the input
        # Inside the mask, away from its border (interpolation and blur reach <= 3 px): red.
        inside = erode(m, 3).bool()
        assert inside.sum() > 20
        assert torch.allclose(im[:, inside].mean(dim=1), RED, atol=3.0), k
        # Away from the pasted object there is no red: the original object was inpainted.
        outside = ~dilate(m, 3).bool()
        red = (im[0] > 120) & (im[1] < 80)
        assert not red[outside].any(), k


def test_same_seed_same_output_other_seed_other_output():
    image, mask = scene()
    aug = FirstFrameAugmenter(evaluation_params())
    a = aug.augment(image, mask, np.random.default_rng(11))
    b = aug.augment(image, mask, np.random.default_rng(11))
    c = aug.augment(image, mask, np.random.default_rng(12))
    d = aug.augment(image, mask)  # default: a fresh default_rng(0) on each call
    e = aug.augment(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_global_rngs_untouched():
    image, mask = scene()
    np.random.seed(123)
    torch.manual_seed(123)
    FirstFrameAugmenter(evaluation_params()).augment(image, mask)
    assert np.random.random() == np.random.RandomState(123).random_sample()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(123)))


@pytest.mark.parametrize("num_aug", [1, 5])
def test_empty_mask_raises(num_aug):
    image, _ = scene()
    with pytest.raises(ValueError, match="first-frame mask has no object"):
        FirstFrameAugmenter(evaluation_params(num_aug)).augment(image, torch.zeros(H, W))


@pytest.mark.parametrize("box", [(60, 61, 100, 101), (10, 12, 200, 202)])
def test_tiny_object_is_scaled_up_to_min_size(box):
    # As upstream (min_px_count = 1, min_size = 10 px), a 1-pixel or 2x2 object is accepted and
    # pasted with its bounding box scaled to at least 10 px, so the masks are never empty.
    image, mask = scene(box)
    images, masks = FirstFrameAugmenter(evaluation_params()).augment(image, mask, np.random.default_rng(3))
    check_output(image, mask, images, masks, 5)
    for m in masks[1:, 0]:
        assert m.sum() >= 25
        rows, cols = m.any(dim=1).nonzero(), m.any(dim=0).nonzero()
        assert rows.max() - rows.min() + 1 >= 7 and cols.max() - cols.min() + 1 >= 7


def test_object_below_min_px_count_raises():
    image, mask = scene((60, 62, 100, 102))
    params = dataclasses.replace(evaluation_params(), min_px_count=5)
    with pytest.raises(ValueError, match="fewer than min_px_count"):
        FirstFrameAugmenter(params).augment(image, mask)


def test_gives_up_with_runtime_error_when_no_frame_verifies():
    # Halving the object always leaves fewer than min_px_count (= its full size) pixels.
    image, mask = scene()
    fg = TransformChoices(rotation=[0], fliplr=[False], scale=[0.5], skew=[(0.0, 0.0)],
                          blur_size=[0.0], blur_angle=[0])
    params = AugmentationParams(num_aug=3, min_px_count=int(mask.sum()), fg_aug_params=fg, max_rounds=2)
    with pytest.raises(RuntimeError, match="after 2 rounds"):
        FirstFrameAugmenter(params).augment(image, mask)


def test_whole_frame_object():
    image, _ = scene()
    mask = torch.ones(H, W)
    images, masks = FirstFrameAugmenter(evaluation_params(3)).augment(image, mask)
    check_output(image, mask, images, masks, 3)
    assert (masks[1:].flatten(1).sum(1) > 0).all()


@pytest.mark.parametrize("size,angle", [(2.0, 45), (5.0, 90), (1.0, 0)])
def test_blur_matches_zero_padded_conv2d(size, angle):
    # Upstream filtered with F.conv2d(padding=k // 2); we use cv2.filter2D with a zero border.
    kernel = _motion_blur_kernel(size, angle)
    assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
    assert abs(kernel.sum() - 1) < 1e-5
    x = np.random.default_rng(0).uniform(0, 255, (17, 23, 4)).astype(np.float32)
    ours = _blur(x, kernel)
    t = torch.from_numpy(x).permute(2, 0, 1).unsqueeze(1)
    ref = F.conv2d(t, torch.from_numpy(kernel)[None, None], padding=kernel.shape[0] // 2)
    np.testing.assert_allclose(ours, ref[:, 0].permute(1, 2, 0).numpy(), atol=1e-3)


def test_a_prepared_result_serves_the_same_inputs_only():
    """`prepare` computes ahead; the call with the same image, mask and generator state takes
    it (same images, generator left as computing leaves it); other inputs are computed."""
    image, mask = scene()
    aug = FirstFrameAugmenter(evaluation_params(4))
    expected_rng = np.random.default_rng(5)
    expected = aug.augmented_frames(image, mask, expected_rng)
    aug.prepare(image, mask, np.random.default_rng(5))
    aug.prepare(image, mask, np.random.default_rng(6))

    other_mask = mask.clone()
    other_mask[0, 0] = 1
    other = aug.augmented_frames(image, other_mask, np.random.default_rng(5))  # another mask: computed
    assert aug.prepared_hits == 0
    assert torch.equal(other[1][0, 0], other_mask.float())
    rng = np.random.default_rng(5)
    got = aug.augmented_frames(image, mask, rng)
    assert aug.prepared_hits == 1
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert rng.bit_generator.state == expected_rng.bit_generator.state
    aug.augmented_frames(image, mask, np.random.default_rng(5))  # taken once: computed again
    assert aug.prepared_hits == 1
    seeded6 = aug.augmented_frames(image, mask, np.random.default_rng(6))
    assert aug.prepared_hits == 2 and not torch.equal(seeded6[0], expected[0])


def test_tracking_with_prepared_first_frames_gives_the_same_results():
    """evaluation.tracking prepares a sequence's first-frame augmentation in a thread while the
    previous sequence tracks; the tracker's start takes it and tracks exactly as without."""
    from benchmarks.tracker_speed import make_frames, random_tracker
    from evaluation.tracking import prepare_first_frame

    frames = make_frames(2, 3, (H, W), seed=3)
    runs = []
    for prepared in (False, True):
        tracker = random_tracker("resnet18", "cpu", num_aug=3)
        if prepared:
            prepare_first_frame(tracker, frames)
        runs.append(tracker.run_sequence(frames, threshold=0.5, keep_raw=True))
        assert tracker.augmenter.prepared_hits == (2 if prepared else 0)
    for a, b in zip(*(r.frames for r in runs)):
        assert torch.equal(a.labels, b.labels)
        assert all(torch.equal(a.logits[i], b.logits[i]) for i in a.logits)


def test_the_next_sequences_first_frame_is_decoded_once():
    """The thread that augments the next sequence's first frame hands the decoded frame on: the
    reader starts from it instead of decoding the frame again."""
    from benchmarks.tracker_speed import make_frames, random_tracker
    from evaluation.tracking import _preparing_next

    class Counted:
        def __init__(self, name, frames):
            self.name, self.frames, self.reads = name, frames, []

        def __len__(self):
            return len(self.frames)

        def __getitem__(self, i):
            self.reads.append(i)
            return self.frames[i]

        def __iter__(self):
            return (self[i] for i in range(len(self)))

    tracker = random_tracker("resnet18", "cpu", num_aug=3)
    sequences = [Counted(f"s{k}", make_frames(1, 3, (H, W), seed=k)) for k in range(3)]
    for seq, frames in _preparing_next(tracker, sequences, {}):
        got = list(frames)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got, seq.frames)) and len(got) == len(seq.frames)
    assert [seq.reads for seq in sequences] == [[0, 1, 2]] * 3
    assert tracker.augmenter.prepared_hits == 0  # prepared only: nothing tracked here
