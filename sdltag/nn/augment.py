"""Training-time augmentation, applied to a whole batch at once in torch.

Random resized crop and horizontal flip are one affine resampling per image
(``affine_grid`` + ``grid_sample``), colour jitter is a few per-image multiplies and
cutout a masked fill, so augmenting a batch costs a fraction of the forward pass on a
CPU, with no per-image Python work and no PIL in the hot loop. Every random draw comes
from the ``generator`` passed in, which makes an interrupted-and-resumed run identical
to an uninterrupted one (its state is saved in the checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AugmentConfig:
    """Strengths of each augmentation; 0 (or a scale of (1, 1)) switches one off."""

    crop_scale: tuple[float, float] = (0.5, 1.0)  # area of the crop as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    flip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.3  # factor drawn from [1 - x, 1 + x]
    contrast: float = 0.3
    saturation: float = 0.3
    cutout: float = 0.5  # probability of one random-colour box
    cutout_size: float = 0.5  # box side as a fraction of the image side (the official recipe: half)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation: the whole image, resized only (what validation sees)."""
        return cls((1.0, 1.0), (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        fields: dict[str, Any] = {key: tuple(v) if isinstance(v, list) else v for key, v in data.items()}
        return cls(**fields)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def random_resized_crop_flip(
    images: Tensor, size: tuple[int, int], config: AugmentConfig, generator: torch.Generator
) -> Tensor:
    """images (B, 3, H, W) float -> (B, 3, h, w): a random crop of each image, resized, maybe flipped."""
    batch, device = images.shape[0], images.device
    area = _uniform(batch, *config.crop_scale, generator, device)
    log_ratio = _uniform(batch, math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]), generator, device)
    ratio = torch.exp(log_ratio)
    half_w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width as a fraction of the image (= half-extent in [-1, 1])
    half_h = torch.sqrt(area / ratio).clamp(max=1.0)
    center_x = (1 - half_w) * (2 * torch.rand(batch, generator=generator, device=device) - 1)
    center_y = (1 - half_h) * (2 * torch.rand(batch, generator=generator, device=device) - 1)
    flip = torch.rand(batch, generator=generator, device=device) < config.flip
    sign = torch.where(flip, -1.0, 1.0).to(images.dtype)
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=device)  # (B, 2, 3) affine maps
    theta[:, 0, 0] = half_w.to(images.dtype) * sign
    theta[:, 0, 2] = center_x.to(images.dtype)
    theta[:, 1, 1] = half_h.to(images.dtype)
    theta[:, 1, 2] = center_y.to(images.dtype)
    grid = F.affine_grid(theta, [batch, images.shape[1], size[0], size[1]], align_corners=False)  # (B, h, w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(images: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Per-image brightness, contrast and saturation factors; images (B, 3, H, W) in [0, 1]."""
    batch, device = images.shape[0], images.device
    shape = (batch, 1, 1, 1)
    if config.brightness > 0:
        factor = _uniform(batch, 1 - config.brightness, 1 + config.brightness, generator, device)
        images = images * factor.view(shape).to(images.dtype)
    if config.contrast > 0:
        factor = _uniform(batch, 1 - config.contrast, 1 + config.contrast, generator, device).view(shape)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        images = (images - mean) * factor.to(images.dtype) + mean
    if config.saturation > 0:
        factor = _uniform(batch, 1 - config.saturation, 1 + config.saturation, generator, device).view(shape)
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=device).view(1, 3, 1, 1)
        gray = (images * weights).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        images = (images - gray) * factor.to(images.dtype) + gray
    return images.clamp(0.0, 1.0)


def cutout(images: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """With probability ``config.cutout``, fill one random box (side ``cutout_size``) with a random colour."""
    if config.cutout <= 0 or config.cutout_size <= 0:
        return images
    batch, _, height, width = images.shape
    device = images.device
    apply = torch.rand(batch, generator=generator, device=device) < config.cutout
    box_h, box_w = max(1, round(height * config.cutout_size)), max(1, round(width * config.cutout_size))
    cy = torch.randint(0, height, (batch,), generator=generator, device=device)
    cx = torch.randint(0, width, (batch,), generator=generator, device=device)
    colour = torch.rand(batch, 3, 1, 1, generator=generator, device=device).to(images.dtype)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    y0, x0 = (cy - box_h // 2).view(-1, 1, 1), (cx - box_w // 2).view(-1, 1, 1)
    mask = (rows >= y0) & (rows < y0 + box_h) & (cols >= x0) & (cols < x0 + box_w)  # (B, H, W)
    mask = (mask & apply.view(-1, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
    return torch.where(mask, colour, images)


def augment_batch(images: Tensor, size: tuple[int, int], config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """uint8 or [0, 1] float images (B, 3, H, W) -> augmented float images (B, 3, h, w) in [0, 1]."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    images = random_resized_crop_flip(images, size, config, generator)
    images = color_jitter(images, config, generator)
    return cutout(images, config, generator)
