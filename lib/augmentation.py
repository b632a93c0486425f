"""First-frame augmentation for initializing the target model (FRTM, Robinson et al., CVPR 2020;
upstream ImageAugmenter).

The object is cut out of the first frame, the hole is inpainted, and the object is pasted back
with a random affine transform (location, rotation, scale, mirroring, skew) and motion blur onto
the background, which itself may be slightly zoomed and blurred. The original frame comes first.

Transform values are drawn from short lists, each list shuffled independently and consumed
without replacement, as upstream's "AugmentationParams2" does. Warping uses cv2 on the CPU
(upstream's CPU path; its CUDA path used an NPP extension).

numpy and OpenCV only (the exported runtime, `deploy/`, uses it without PyTorch);
`models.augmenter.FirstFrameAugmenter` takes and returns the tracker's tensors.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np

Location = tuple[float, float]


@dataclass
class TransformChoices:
    """Lists that one augmentation's transform values are drawn from.

    rotation:   degrees.
    fliplr:     mirror about the vertical axis.
    scale:      float: scale factor; str: new object height as a fraction of the image height.
    skew:       (kx, ky) off-diagonal coefficients of the linear part.
    blur_size:  variance (px^2) of the motion-blur Gaussian along its direction; 0 = no blur.
    blur_angle: direction of the motion blur, degrees.
    location:   new object centre as fractions (x of width, y of height). Ignored for the
                foreground, whose locations are laid out on a jittered grid for every call.
    """

    rotation: list[float]
    fliplr: list[bool]
    scale: list[float | str]
    skew: list[tuple[float, float]]
    blur_size: list[float]
    blur_angle: list[float]
    location: list[Location] = field(default_factory=lambda: [(0.5, 0.5)])


@dataclass
class AugmentationParams:
    """Settings of the first-frame augmenter (upstream `aug_params`).

    num_aug:         images returned, the original included.
    min_px_count:    an augmented object must keep at least this many mask pixels (and leave at
                     least this many background pixels unless the input had no background).
    fg_aug_params:   choices for the object's transform.
    bg_aug_params:   choices for the background's transform; None keeps the background as is.
    specs_per_round: transforms drawn per round. Upstream's parameter objects carried a default
                     num_aug of 20 that its spec generator used, so it drew 19 per round.
    max_rounds:      rounds of drawing before giving up.
    min_size:        lower bound (px) on the pasted object's scaled bounding-box width and height.
    """

    num_aug: int
    min_px_count: int
    fg_aug_params: TransformChoices
    bg_aug_params: TransformChoices | None = None
    specs_per_round: int = 19
    max_rounds: int = 100
    min_size: float = 10.0


def _upstream_params(num_aug: int) -> AugmentationParams:
    # evaluate.py and train.py use identical lists; only num_aug differs.
    fg = TransformChoices(
        rotation=[5, -5, 10, -10, 20, -20, 30, -30, 45, -45],
        fliplr=[False, False, False, False, True],
        scale=[0.5, 0.7, 1.0, 1.5, 2.0, 2.5],
        skew=[(0.0, 0.0), (0.0, 0.0), (0.1, 0.1)],
        blur_size=[0.0, 0.0, 0.0, 2.0],
        blur_angle=[0, 45, 90, 135],
    )
    bg = TransformChoices(
        rotation=[0, 0, 0],
        fliplr=[False],
        scale=[1.0, 1.0, 1.2],
        skew=[(0.0, 0.0)],
        blur_size=[0.0, 0.0, 1.0, 2.0, 5.0],
        blur_angle=[0, 45, 90, 135],
        location=[(0.5, 0.5)],
    )
    return AugmentationParams(num_aug=num_aug, min_px_count=1, fg_aug_params=fg, bg_aug_params=bg)


def evaluation_params(num_aug: int = 5) -> AugmentationParams:
    """Upstream evaluate.py settings."""
    return _upstream_params(num_aug)


def training_params(num_aug: int = 15) -> AugmentationParams:
    """Upstream train.py settings."""
    return _upstream_params(num_aug)


@dataclass
class _Spec:
    """One drawn transform (see TransformChoices for the meaning of the fields)."""

    location: Location
    rotation: float
    fliplr: bool
    scale: float | str
    skew: tuple[float, float]
    blur_size: float
    blur_angle: float


# 3x3 homogeneous matrices acting on (x, y, 1) column vectors.

def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _rotation(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def _scaling(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


def _shear(kx: float, ky: float) -> np.ndarray:
    return np.array([[1.0, kx, 0.0], [ky, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _motion_blur_kernel(size: float, angle: float) -> np.ndarray:
    """Oriented Gaussian kernel (k, k), k odd: variance `size` along `angle`, 0.1 across."""
    rot = _rotation(angle)[:2, :2]
    cov = rot @ np.diag([size, 0.1]) @ rot.T
    half = int(max(size, 0.1) / 2 + 0.5)
    if half % 2 == 0:  # upstream forces the half-width odd
        half += 1
    offsets = np.arange(-half, half + 1)
    dx, dy = np.meshgrid(offsets, offsets)  # dx varies along columns, dy along rows
    d = np.stack([dx, dy], axis=-1).astype(np.float64)
    quad = np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)
    kernel = np.exp(-0.5 * quad)
    return (kernel / kernel.sum()).astype(np.float32)


def _center_bbox(mask: np.ndarray) -> tuple[float, float, int, int]:
    """(centre x, centre y, width, height) of the nonzero pixels of an (H, W) mask.

    The centre is measured on pixel edges: one pixel at column 5 has centre x 5.5 (as upstream).
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    w = int(cols[-1] - cols[0] + 1)
    h = int(rows[-1] - rows[0] + 1)
    return cols[0] + w / 2, rows[0] + h / 2, w, h


def _ellipse(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _cut_and_inpaint(image: np.ndarray, mask: np.ndarray, d: int = 1, f: int = 1
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Cut the object out of `image` and inpaint the hole.

    image: (H, W, 3) uint8; mask: (H, W) uint8 0/1; d: hole dilation / inpaint radius;
    f: alpha feather width. Upstream calls this with d = f = 1, where the erosions and blurs
    below are identities but the hole still grows by one pixel up and left.
    Returns the object as (H, W, 4) uint8 RGBA (alpha 0..255) and the inpainted (H, W, 3) uint8.
    """
    alpha = cv2.blur(cv2.erode(mask, _ellipse(f)) * 255, (f, f))
    rgba = np.concatenate([image * mask[..., None], alpha[..., None]], axis=-1)

    inner = cv2.erode(mask, _ellipse(d))
    hole = cv2.dilate(mask, _ellipse(2 * d))
    filled = cv2.inpaint(image, hole, d, cv2.INPAINT_TELEA)

    # Soften the ring between the eroded object and the dilated hole.
    ring = cv2.blur((1 - inner) * hole * 255, (d, d)).astype(np.float64)[..., None] / 255
    blurred = cv2.blur(filled, (d, d)).astype(np.float64)
    filled = (blurred * ring + filled * (1 - ring)).astype(np.uint8)
    return rgba, filled


def _warp(planes: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
    """Warp (H, W, C) or (H, W) by the forward affine `matrix` (3x3), zeros outside."""
    h, w = planes.shape[:2]
    out = cv2.warpAffine(planes, matrix[:2].astype(np.float32), (w, h), flags=interpolation,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if planes.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel axis
        out = out[..., None]
    return out


def _blur(planes: np.ndarray, kernel: np.ndarray | None) -> np.ndarray:
    """Per-channel correlation of float32 (H, W, C) with zero padding (as a padded conv2d)."""
    if kernel is None:
        return planes
    out = cv2.filter2D(planes, -1, kernel, borderType=cv2.BORDER_CONSTANT)
    return out[..., None] if out.ndim == 2 else out


class HostAugmenter:
    """Turns an object's first frame and mask (numpy) into `num_aug` training images."""

    PREPARED_CAPACITY = 16  # `prepare`d results kept

    def __init__(self, params: AugmentationParams):
        if params.num_aug < 1:
            raise ValueError(f"num_aug must be at least 1, got {params.num_aug}")
        self.params = params
        self._prepared: OrderedDict = OrderedDict()  # key -> (images, masks, generator state after)
        self._lock = threading.Lock()
        self.prepared_hits = 0  # calls answered from `prepare`d results

    def __getstate__(self) -> dict:  # a copy (or another process) starts without prepared results
        return {**self.__dict__, "_lock": None, "_prepared": OrderedDict()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def host_frames(self, image: np.ndarray | None, mask: np.ndarray,
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """image uint8 (H, W, 3) (None when num_aug is 1: not needed), mask (H, W) (> 0 is the
        object) -> uint8 images (K - 1, H, W, 3) of the augmented frames only and float32 masks
        (K, 1, H, W), the input's first. All randomness from `rng` (default: a fresh
        np.random.default_rng(0)). A result `prepare`d for the same image, mask and generator
        state is taken instead of computed. Raises ValueError for an empty mask or one below
        min_px_count, RuntimeError when max_rounds of drawing do not yield num_aug - 1 frames
        that keep the object."""
        image_np, mask_np = self._checked(image, mask)
        rng = np.random.default_rng(0) if rng is None else rng
        prepared = self._take_prepared(image_np, mask_np, rng) if self._prepared else None
        if prepared is None:
            return self._host_frames(image_np, mask_np, rng)
        images, masks, rng.bit_generator.state = prepared
        self.prepared_hits += 1
        return images, masks

    def prepare_host(self, image: np.ndarray | None, mask: np.ndarray, rng: np.random.Generator | None = None) -> None:
        """Compute `host_frames(image, mask, rng)` ahead, e.g. in a background thread, and keep it
        (the latest `PREPARED_CAPACITY`) for the call with the same image, mask and generator
        state, which then returns it, leaving its generator in the state computing would.
        Thread-safe. An input that cannot be augmented is left for that call to raise."""
        rng = np.random.default_rng(0) if rng is None else rng
        try:
            image_np, mask_np = self._checked(image, mask)
            key = self._key(image_np, mask_np, rng)
            images, masks = self._host_frames(image_np, mask_np, rng)
        except (ValueError, RuntimeError):
            return
        with self._lock:
            self._prepared[key] = (images, masks, rng.bit_generator.state)
            while len(self._prepared) > self.PREPARED_CAPACITY:
                self._prepared.popitem(last=False)

    @staticmethod
    def _key(image_np: np.ndarray | None, mask_np: np.ndarray, rng: np.random.Generator) -> tuple:
        digest = hashlib.blake2b(mask_np.tobytes(), digest_size=16)
        if image_np is not None:
            digest.update(image_np.tobytes())
        return mask_np.shape, digest.hexdigest(), repr(rng.bit_generator.state)

    def _take_prepared(self, image_np: np.ndarray | None, mask_np: np.ndarray, rng: np.random.Generator):
        key = self._key(image_np, mask_np, rng)
        with self._lock:
            return self._prepared.pop(key, None)

    def _checked(self, image: np.ndarray | None, mask: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Checked inputs: image (H, W, 3) uint8 (None when num_aug is 1: not needed) and mask
        (H, W) uint8 0/1."""
        mask_np = np.ascontiguousarray(np.asarray(mask) > 0).astype(np.uint8)
        if image is not None and (image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask_np.shape):
            raise ValueError(f"mask shape {mask_np.shape} does not match image {image.shape}")
        px_count = int(mask_np.sum())
        if px_count == 0:
            raise ValueError("first-frame mask has no object")
        if px_count < self.params.min_px_count:
            raise ValueError(f"first-frame object has {px_count} pixels, "
                             f"fewer than min_px_count={self.params.min_px_count}")
        if self.params.num_aug == 1:
            return None, mask_np
        return np.ascontiguousarray(image, dtype=np.uint8), mask_np

    def _host_frames(self, image_np: np.ndarray | None, mask_np: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (K - 1, H, W, 3) and float32 masks (K, 1, H, W), the input mask first."""
        images, masks = [], [mask_np]
        if image_np is not None:
            images, augmented_masks = self._augmented_frames(image_np, mask_np, bool(mask_np.all()), rng)
            masks += augmented_masks
        h, w = mask_np.shape
        images_np = np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8)
        return images_np, np.stack(masks).astype(np.float32)[:, None]

    def _augmented_frames(self, image: np.ndarray, mask: np.ndarray, no_background: bool,
                          rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """num_aug - 1 verified augmentations: lists of (H, W, 3) uint8 images, (H, W) uint8 masks."""
        p = self.params
        needed = p.num_aug - 1
        im_size = image.shape[:2]
        bbox = _center_bbox(mask)
        obj_rgba, background = _cut_and_inpaint(image, mask)
        locations = self._grid_locations(p.num_aug, im_size, rng)

        images, masks = [], []
        for _ in range(p.max_rounds):
            fg_specs = self._draw_specs(p.fg_aug_params, locations, rng)
            if p.bg_aug_params is not None:
                bg_specs = self._draw_specs(p.bg_aug_params, p.bg_aug_params.location, rng)
            else:
                bg_specs = [None] * len(fg_specs)

            # The drawn specs are exchangeable, so taking the first good ones equals upstream's
            # random choice among all good ones of a round, without warping the rest.
            for fg_spec, bg_spec in zip(fg_specs, bg_specs):
                new_image, new_mask = self._compose(background, obj_rgba, mask, bbox, fg_spec, bg_spec)
                if self._is_good(new_mask, no_background):
                    images.append(new_image)
                    masks.append(new_mask)
                    if len(images) == needed:
                        return images, masks

        raise RuntimeError(f"augmentation failed: only {len(images)} of {needed} frames kept the "
                           f"object after {p.max_rounds} rounds")

    @staticmethod
    def _grid_locations(n: int, im_size: tuple[int, int], rng: np.random.Generator) -> list[Location]:
        """n object centres (fractions x, y) from a shuffled, jittered grid over the image."""
        h, w = im_size
        aspect = w / h
        nrows = int(math.ceil(math.sqrt(n / aspect)))
        ncols = int(math.ceil(aspect * nrows))
        jitter_x, jitter_y = 0.5 / ncols / 4, 0.5 / nrows / 4
        centres = []
        for r in range(nrows):
            for c in range(ncols):
                x = (c + 0.5) / ncols + rng.normal(0.0, jitter_x)
                y = (r + 0.5) / nrows + rng.normal(0.0, jitter_y)
                centres.append((round(x, 3), round(y, 3)))
        order = rng.permutation(len(centres))
        return [centres[i] for i in order[:n]]

    def _draw_specs(self, choices: TransformChoices, locations: list[Location],
                    rng: np.random.Generator) -> list[_Spec]:
        """specs_per_round specs; each field drawn without replacement from its (repeated) list."""
        n = self.params.specs_per_round

        def draw(values: list) -> list:
            pool = list(values) * math.ceil(n / len(values))
            return [pool[i] for i in rng.permutation(len(pool))[:n]]

        columns = dict(location=draw(locations), rotation=draw(choices.rotation),
                       fliplr=draw(choices.fliplr), scale=draw(choices.scale), skew=draw(choices.skew),
                       blur_size=draw(choices.blur_size), blur_angle=draw(choices.blur_angle))
        return [_Spec(**{k: v[i] for k, v in columns.items()}) for i in range(n)]

    def _transform(self, spec: _Spec, bbox: tuple[float, float, float, float], im_size: tuple[int, int],
                   limit_scale: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward affine (3x3) moving the bbox centre to spec.location, and the blur kernel."""
        cx, cy, bw, bh = bbox
        im_h, im_w = im_size

        s = spec.scale
        if isinstance(s, str):
            s = float(s) * im_h / bh
        if limit_scale:
            if s * bw > im_w or s * bh > im_h:
                s = min(im_w / bw, im_h / bh)
            if s * bw < self.params.min_size or s * bh < self.params.min_size:
                s = max(self.params.min_size / bw, self.params.min_size / bh)
        sx = -s if spec.fliplr else s

        matrix = (_translation(spec.location[0] * im_w, spec.location[1] * im_h) @ _shear(*spec.skew)
                  @ _rotation(spec.rotation) @ _scaling(sx, s) @ _translation(-cx, -cy))
        kernel = _motion_blur_kernel(spec.blur_size, spec.blur_angle) if spec.blur_size > 0 else None
        return matrix, kernel

    def _compose(self, background: np.ndarray, obj_rgba: np.ndarray, mask: np.ndarray,
                 bbox: tuple[float, float, float, float], fg_spec: _Spec, bg_spec: _Spec | None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """One augmented frame: (H, W, 3) uint8 image and (H, W) uint8 mask."""
        im_size = background.shape[:2]
        h, w = im_size

        canvas = background.astype(np.float32)
        if bg_spec is not None:
            matrix, kernel = self._transform(bg_spec, (w / 2, h / 2, w, h), im_size, limit_scale=False)
            canvas = _blur(np.clip(_warp(canvas, matrix, cv2.INTER_CUBIC), 0, 255), kernel)

        matrix, kernel = self._transform(fg_spec, bbox, im_size, limit_scale=True)
        obj = np.clip(_warp(obj_rgba.astype(np.float32), matrix, cv2.INTER_CUBIC), 0, 255)
        obj = _blur(obj, kernel)  # the mask is not blurred
        new_mask = _warp(mask, matrix, cv2.INTER_NEAREST)

        alpha = obj[..., 3:] / 255
        pasted = obj[..., :3] * alpha + canvas * (1 - alpha)
        return np.clip(pasted, 0, 255).astype(np.uint8), new_mask  # truncates, as upstream's .byte()

    def _is_good(self, new_mask: np.ndarray, no_background: bool) -> bool:
        """The object keeps at least min_px_count pixels and, unless the input had no
        background, does not cover all but fewer than min_px_count pixels of the frame."""
        min_px = self.params.min_px_count
        px_count = int(new_mask.sum())
        return px_count >= min_px and (px_count < new_mask.size - min_px or no_background)
