"""Batched augmentation of [0, 1] digit images as tensor ops on the training device.

Each image in a batch gets its own random parameters; one ``affine_grid`` plus one
``grid_sample`` warps the whole batch. No horizontal flips anywhere: digits are not
flip-invariant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fewshot.errors import UserError


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def affine_matrices(
    angle_deg: torch.Tensor,
    scale: torch.Tensor,
    shear_deg: torch.Tensor,
    translate: torch.Tensor,
) -> torch.Tensor:
    """(N, 2, 3) matrices mapping output to input coordinates for ``affine_grid``.

    ``scale`` > 1 enlarges the digit; ``translate`` is a fraction of the image size.
    """
    a = torch.deg2rad(angle_deg)
    s = torch.deg2rad(shear_deg)
    cos, sin = torch.cos(a), torch.sin(a)
    # forward map: rotation @ shear(x) then scale; invert it for the sampling grid
    forward = torch.zeros(angle_deg.shape[0], 3, 3, device=angle_deg.device)
    forward[:, 0, 0] = cos * scale
    forward[:, 0, 1] = (cos * torch.tan(s) - sin) * scale
    forward[:, 1, 0] = sin * scale
    forward[:, 1, 1] = (sin * torch.tan(s) + cos) * scale
    forward[:, 0, 2] = translate[:, 0] * 2
    forward[:, 1, 2] = translate[:, 1] * 2
    forward[:, 2, 2] = 1
    return torch.linalg.inv(forward)[:, :2, :]


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class AffineSpec:
    """Ranges of a random affine: rotation and shear in degrees (symmetric), scale as
    (low, high), translation as a fraction of the side (symmetric)."""

    rotation: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.1
    shear: float = 10.0

    def scaled(self, strength: float) -> AffineSpec:
        """The same family, wider (strength > 1) or narrower (< 1)."""
        lo, hi = self.scale
        return replace(
            self,
            rotation=self.rotation * strength,
            scale=(1 - (1 - lo) * strength, 1 + (hi - 1) * strength),
            translate=self.translate * strength,
            shear=self.shear * strength,
        )


TTA_SPEC = AffineSpec().scaled(0.5)  # test-time views: the default affine at half strength


def random_affine(x: torch.Tensor, spec: AffineSpec, generator: torch.Generator) -> torch.Tensor:
    n, device = x.shape[0], x.device
    angle = _uniform(n, -spec.rotation, spec.rotation, generator, device)
    scale = _uniform(n, spec.scale[0], spec.scale[1], generator, device)
    shear = _uniform(n, -spec.shear, spec.shear, generator, device)
    translate = torch.stack([_uniform(n, -spec.translate, spec.translate, generator, device) for _ in range(2)], dim=1)
    return warp(x, affine_matrices(angle, scale, shear, translate))


class OnlineAffine:
    """The default supervised augmentation: a fresh random affine for every image, every step."""

    def __init__(self, spec: AffineSpec = AffineSpec()) -> None:
        self.spec = spec

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_affine(x, self.spec, generator)


# ----------------------------------------------------- the report's offline expansion

REPORT_TRANSFORMS: dict[str, AffineSpec] = {
    # rotation 45; resized crop of 80-100% of the area (zoom 1 to 1/sqrt(0.8));
    # translation 0.1; shear 30; and all of them combined
    "rotation45": AffineSpec(rotation=45, scale=(1, 1), translate=0, shear=0),
    "crop_resize": AffineSpec(rotation=0, scale=(1.0, 1 / math.sqrt(0.8)), translate=0, shear=0),
    "translation": AffineSpec(rotation=0, scale=(1, 1), translate=0.1, shear=0),
    "shear30": AffineSpec(rotation=0, scale=(1, 1), translate=0, shear=30),
    "pipeline": AffineSpec(rotation=45, scale=(1.0, 1 / math.sqrt(0.8)), translate=0.1, shear=30),
}


def offline_expand(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, copies: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """The report's fixed expansion: originals plus ``copies`` new images per original and transform."""
    images, labels = [x], [y]
    for spec in REPORT_TRANSFORMS.values():
        repeated = x.repeat_interleave(copies, dim=0)
        images.append(random_affine(repeated, spec, generator))
        labels.append(y.repeat_interleave(copies))
    return torch.cat(images), torch.cat(labels)


# ----------------------------------------------------- photometric and occlusion ops


def brightness_contrast(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    n, device = x.shape[0], x.device
    brightness = _uniform(n, 1 - strength, 1 + strength, generator, device).view(n, 1, 1, 1)
    contrast = _uniform(n, 1 - strength, 1 + strength, generator, device).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x * brightness - mean) * contrast + mean).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, probability: float, sigma_max: float, generator: torch.Generator) -> torch.Tensor:
    """Blur a random subset of the batch, each image with its own sigma (3x3 separable kernel)."""
    n, device = x.shape[0], x.device
    sigma = _uniform(n, 0.1, sigma_max, generator, device)
    apply = torch.rand(n, generator=generator, device=device) < probability
    offsets = torch.tensor([-1.0, 0.0, 1.0], device=device)
    kernel = torch.exp(-(offsets.view(1, 3) ** 2) / (2 * sigma.view(n, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (n, 3)
    # three weighted shifted copies per direction: a per-image 3-tap kernel without a grouped
    # convolution (oneDNN runs a 1-channel-per-group conv of a whole batch ~100x slower on CPU)
    k0, k1, k2 = (kernel[:, i].view(n, 1, 1, 1) for i in range(3))
    xp = F.pad(x, (1, 1, 0, 0), mode="replicate")
    rows = k0 * xp[..., :-2] + k1 * xp[..., 1:-1] + k2 * xp[..., 2:]
    rp = F.pad(rows, (0, 0, 1, 1), mode="replicate")
    blurred = k0 * rp[..., :-2, :] + k1 * rp[..., 1:-1, :] + k2 * rp[..., 2:, :]
    return torch.where(apply.view(n, 1, 1, 1), blurred, x)


def random_erase(x: torch.Tensor, probability: float, max_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Zero one random square per selected image, of up to ``max_fraction`` of the side."""
    n, _, h, w = x.shape
    device = x.device
    apply = torch.rand(n, generator=generator, device=device) < probability
    side = (_uniform(n, 0.1, max_fraction, generator, device) * h).round().clamp(min=1)
    top = (torch.rand(n, generator=generator, device=device) * (h - side + 1)).floor()
    left = (torch.rand(n, generator=generator, device=device) * (w - side + 1)).floor()
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1)) & (rows < (top + side).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1)) & (cols < (left + side).view(n, 1, 1))
    )  # fmt: skip
    mask = inside & apply.view(n, 1, 1)
    return x.masked_fill(mask.unsqueeze(1), 0.0)


def _band(kernel: torch.Tensor, radius: int, size: int) -> torch.Tensor:
    """(size, size) matrix M with M[i, j] = kernel[j - i + radius]: M @ v is the zero-padded 1-D convolution."""
    i = torch.arange(size, device=kernel.device)
    offset = i.view(1, -1) - i.view(-1, 1) + radius
    inside = (offset >= 0) & (offset < kernel.numel())
    return torch.where(inside, kernel[offset.clamp(0, kernel.numel() - 1)], torch.zeros((), device=kernel.device))


def elastic_displacement(
    n: int, h: int, w: int, alpha: float, sigma: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Smoothed random displacement fields (n, h, w, 2) in grid_sample's [-1, 1] coordinates."""
    noise = torch.rand(n, 2, h, w, generator=generator, device=device) * 2 - 1
    radius = max(1, int(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    # the zero-padded separable Gaussian as two small matrix products (band matrices), much
    # faster on CPU than a 1-channel convolution with a long kernel
    noise = _band(kernel, radius, h) @ noise @ _band(kernel, radius, w).T
    return noise.permute(0, 2, 3, 1) * (alpha * 2 / h)


def elastic(x: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Elastic deformation (Simard et al.): a smoothed random displacement field per image."""
    n, _, h, w = x.shape
    device = x.device
    displacement = elastic_displacement(n, h, w, alpha, sigma, generator, device)
    base = F.affine_grid(torch.eye(2, 3, device=device).expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, base + displacement, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------- two-view contrastive augmentation


@dataclass(frozen=True)
class ViewSpec:
    """One view of an image for contrastive learning or the strong branch of
    consistency training. ``crop_scale`` is the area fraction kept by the resized crop."""

    crop_scale: tuple[float, float] = (0.4, 1.0)
    rotation: float = 10.0
    shear: float = 5.0
    jitter: float = 0.4
    blur_probability: float = 0.3
    blur_sigma: float = 1.0
    erase_probability: float = 0.0
    erase_fraction: float = 0.5
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0
    stroke_probability: float = 0.0  # share of images whose strokes get thicker or thinner
    bar_probability: float = 0.0  # share of images that get a short horizontal bar across the middle stroke

    def scaled(self, strength: float) -> ViewSpec:
        lo, hi = self.crop_scale
        return replace(
            self,
            crop_scale=(max(0.05, 1 - (1 - lo) * strength), hi),
            rotation=self.rotation * strength,
            shear=self.shear * strength,
            jitter=min(0.9, self.jitter * strength),
            elastic_alpha=self.elastic_alpha * strength,
        )


# The strong view of a digit, never flipped: larger affine with zoom in and out, elastic strokes,
# thicker or thinner pen, contrast, a little blur and a mild cutout (half the images, a square of
# at most 40% of the side). Semi-supervised training and fine-tuning add crossbars on top.
STRONG_DIGITS = ViewSpec(
    crop_scale=(0.6, 1.25),
    rotation=25.0,
    shear=15.0,
    jitter=0.5,
    blur_probability=0.2,
    blur_sigma=1.0,
    erase_probability=0.5,
    erase_fraction=0.4,
    elastic_alpha=30.0,
    elastic_sigma=4.0,
    stroke_probability=0.3,
)


class OnlineView:
    """A fresh ``random_view`` of every image, every step (a supervised augmentation like OnlineAffine)."""

    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_view(x, self.spec, generator)


def random_view(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> torch.Tensor:
    n, device = x.shape[0], x.device
    if spec.stroke_probability > 0:
        x = stroke_width(x, spec.stroke_probability, generator)
    if spec.bar_probability > 0:
        x = crossbar(x, spec.bar_probability, generator)
    area = _uniform(n, spec.crop_scale[0], spec.crop_scale[1], generator, device)
    zoom = 1 / area.sqrt()  # keeping a fraction `area` of the image and resizing it back
    # the kept window must stay inside the image: centre offset at most (1 - 1/zoom) / 2
    room = (1 - 1 / zoom) / 2
    centre = (torch.rand(n, 2, generator=generator, device=device) * 2 - 1) * room.view(n, 1)
    angle = _uniform(n, -spec.rotation, spec.rotation, generator, device)
    shear = _uniform(n, -spec.shear, spec.shear, generator, device)
    theta = affine_matrices(angle, zoom, shear, -centre * zoom.view(n, 1))
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if spec.elastic_alpha > 0:  # one resampling for both: the elastic field is added to the affine grid
        _, _, h, w = x.shape
        grid = grid + elastic_displacement(n, h, w, spec.elastic_alpha, spec.elastic_sigma, generator, device)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if spec.jitter > 0:
        out = brightness_contrast(out, spec.jitter, generator)
    if spec.blur_probability > 0:
        out = gaussian_blur(out, spec.blur_probability, spec.blur_sigma, generator)
    if spec.erase_probability > 0:
        out = random_erase(out, spec.erase_probability, spec.erase_fraction, generator)
    return out


def two_views(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return random_view(x, spec, generator), random_view(x, spec, generator)


# ----------------------------------------------------- the supervised choice by name

AUGMENT_CHOICES = ("online", "offline", "none")


def check_augment(name: str) -> str:
    if name not in AUGMENT_CHOICES:
        raise UserError(f"--augment {name}: unknown augmentation; choose one of {', '.join(AUGMENT_CHOICES)}")
    return name


def stroke_width(x: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Thicken (3x3 grey dilation) or thin (half a 3x3 erosion) the strokes of a random subset of
    the batch, half each: pen width varies between writers, the digit does not."""
    n, device = x.shape[0], x.device
    draw = torch.rand(n, generator=generator, device=device)
    thicken = (draw < probability / 2).view(n, 1, 1, 1)
    thin = ((draw >= probability / 2) & (draw < probability)).view(n, 1, 1, 1)
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = (x - F.max_pool2d(-x, 3, stride=1, padding=1)) / 2  # half-way: a full 3x3 erosion erases thin digits
    return torch.where(thicken, dilated, torch.where(thin, eroded, x))


def crossbar(x: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Draw a short horizontal bar across the stroke near mid-height of a random subset of the
    batch: some writers cross their sevens (and zeds), and the bar does not change the digit.
    The bar is centred on the ink of its row band, 6-12 pixels long and 1-2 pixels thick."""
    n, _, h, w = x.shape
    device = x.device
    apply = (torch.rand(n, generator=generator, device=device) < probability).view(n, 1, 1, 1)
    row = _uniform(n, 0.46 * h, 0.58 * h, generator, device).view(n, 1, 1)
    rows = torch.arange(h, device=device, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, device=device, dtype=x.dtype).view(1, 1, w)
    band = (rows - row).abs() <= 1.5  # (n, h, 1): the rows the bar covers, where the stroke is found
    ink = (x[:, 0] * band).sum(dim=1)  # (n, w)
    centre = (ink * cols.view(1, w)).sum(dim=1) / ink.sum(dim=1).clamp(min=1e-6)
    centre = torch.where(ink.sum(dim=1) > 1e-3, centre, torch.full_like(centre, (w - 1) / 2))
    centre = centre + _uniform(n, -1.5, 1.5, generator, device)
    half = _uniform(n, 3.0, 6.0, generator, device).view(n, 1, 1)
    thick = _uniform(n, 1.0, 2.0, generator, device).view(n, 1, 1)
    vertical = (thick / 2 + 0.5 - (rows - row).abs()).clamp(0, 1)
    horizontal = (half + 0.5 - (cols - centre.view(n, 1, 1)).abs()).clamp(0, 1)
    bar = (vertical * horizontal).unsqueeze(1)
    return torch.where(apply, torch.maximum(x, bar), x)
