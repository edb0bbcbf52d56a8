"""Gemma 4's image processor: resize to a resolution tier, cut into patches, give each patch its (x, y).

An image becomes at most T soft tokens, T one of the tiers 70 / 140 / 280 / 560 / 1120 (the config's
default or a per-call choice). The image is scaled, up or down, keeping its aspect ratio, to the largest
size whose sides are multiples of k·p (pooling kernel × patch size, 3 × 16 = 48) and that has at most
k²·T patches; every k×k block of patches later pools into one soft token. Pixels are rescaled to [0, 1]
and not normalized (the model maps them to [-1, 1] itself).

Resizing uses Pillow's bicubic filter, which is what transformers' `Gemma4ImageProcessorPil` does, so pixel
values equal it exactly. transformers' default `Gemma4ImageProcessor` resizes with torchvision (bicubic
with antialiasing on uint8 tensors); the two filters differ by a few 1/255 steps on some pixels, while sizes,
soft-token counts, patch order and positions are the same. Pillow needs no torchvision and no second torch.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..config import IMAGE_TIERS, VisionConfig
from ..errors import NotSupportedError, RequestError

# Images and video frames above this many pixels are refused before they are decoded: a 13000×13000 PNG of a
# few hundred KB (under Pillow's 179-megapixel bomb limit) takes gigabytes and seconds to decode and composite,
# for an image that is then scaled to at most 1120 soft tokens (~1,000 pixels a side). 8K (33 MP) passes.
MAX_PIXELS = 50_000_000

ImageInput = Union["PIL.Image.Image", str, Path, bytes, np.ndarray]  # noqa: F821


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise NotSupportedError("images need Pillow: pip install pillow") from None
    return Image


@dataclass
class ProcessedImage:
    """One image as the vision tower takes it (unpadded)."""

    pixel_values: torch.Tensor  # [P, 3·p²] float32 in [0, 1]; each row is (py, px, c) with c fastest
    positions: torch.Tensor  # [P, 2] int64 (x = column, y = row), patches in row-major order
    num_soft_tokens: int  # P / k²: the placeholders the image takes in a prompt
    size: tuple[int, int]  # (height, width) after resizing


def check_tier(soft_tokens: int) -> int:
    if soft_tokens not in IMAGE_TIERS:
        raise RequestError(f"image soft tokens {soft_tokens!r} is not a tier; choose one of {list(IMAGE_TIERS)}")
    return int(soft_tokens)


def check_pixels(width: int, height: int, what: str = "the image") -> None:
    if width * height > MAX_PIXELS:
        raise RequestError(f"{what} is {width}×{height} pixels ({width * height / 1e6:.0f} megapixels), more than "
                           f"the limit of {MAX_PIXELS / 1e6:.0f} megapixels")


def target_size(height: int, width: int, soft_tokens: int, patch_size: int = 16, pooling_kernel_size: int = 3) -> tuple[int, int]:
    """(height, width) to resize to: aspect ratio kept, sides multiples of k·p, at most k²·T patches.
    A side that would round to 0 becomes k·p and the other ⌊long/short⌋·k·p, at most T·k·p."""
    if height < 1 or width < 1:
        raise RequestError(f"an image of {width}×{height} pixels is empty")
    max_patches = soft_tokens * pooling_kernel_size**2
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    new_h = int(math.floor(factor * height / side)) * side
    new_w = int(math.floor(factor * width / side)) * side
    longest = soft_tokens * side
    if new_h == 0:
        new_h, new_w = side, min(int(math.floor(width / height)) * side, longest)
    elif new_w == 0:
        new_h, new_w = min(int(math.floor(height / width)) * side, longest), side
    return new_h, new_w


def to_rgb(image: Any) -> "PIL.Image.Image":  # noqa: F821
    """A PIL RGB image from a PIL image, a file path, encoded bytes or an [H, W, 3] uint8 array. Transparency
    is composited onto white, as transformers does. A file over MAX_PIXELS is refused before it is decoded."""
    Image = _pil()
    if isinstance(image, (str, Path, bytes)):
        image = _decode(image)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise RequestError(f"an image array must be [height, width, 3] uint8, got {list(image.shape)} {image.dtype}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise RequestError(f"cannot use a {type(image).__name__} as an image (a PIL image, a path, bytes or an array)")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # one paste onto white through the alpha channel: the same pixels as transformers' alpha_composite onto
        # a white RGBA image, without its three full-size RGBA copies
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, (0, 0), rgba)
        return white
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode(source: str | Path | bytes) -> "PIL.Image.Image":  # noqa: F821
    """Open (which reads only the header), check the size, then decode."""
    Image = _pil()
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise RequestError(f"image file {source} not found") from None
    except Image.UnidentifiedImageError:  # its message names the file object, a memory address
        raise RequestError("cannot read the image: not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, "
                           "TIFF)") from None
    except Exception as e:  # Pillow raises OSError, DecompressionBombError, ...
        raise RequestError(f"cannot read the image: {e}") from None
    check_pixels(image.width, image.height)
    try:
        image.load()
    except Exception as e:
        raise RequestError(f"cannot read the image: {e}") from None
    return image


def patchify(pixels: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, W, 3] -> patches [H/p · W/p, p·p·3] (row-major over the grid; inside a patch (py, px, c)) and their
    positions [N, 2] as (x, y)."""
    h, w, c = pixels.shape
    gh, gw = h // patch_size, w // patch_size
    patches = pixels.reshape(gh, patch_size, gw, patch_size, c).permute(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return patches, torch.stack([xs.flatten(), ys.flatten()], dim=-1)


class ImageProcessor:
    """Images -> `ProcessedImage`s for `letterpress.model.vision.VisionModel`."""

    def __init__(self, patch_size: int = 16, pooling_kernel_size: int = 3, default_soft_tokens: int = 280):
        self.patch_size = patch_size
        self.pooling_kernel_size = pooling_kernel_size
        self.default_soft_tokens = check_tier(default_soft_tokens)

    @classmethod
    def from_config(cls, config: VisionConfig) -> "ImageProcessor":
        return cls(config.patch_size, config.pooling_kernel_size, config.default_soft_tokens)

    def target_size(self, height: int, width: int, soft_tokens: int | None = None) -> tuple[int, int]:
        tier = check_tier(soft_tokens or self.default_soft_tokens)
        return target_size(height, width, tier, self.patch_size, self.pooling_kernel_size)

    def num_soft_tokens(self, height: int, width: int, soft_tokens: int | None = None) -> int:
        """The placeholders an image of this size takes, without decoding it."""
        h, w = self.target_size(height, width, soft_tokens)
        return (h // self.patch_size) * (w // self.patch_size) // self.pooling_kernel_size**2

    def __call__(self, image: ImageInput, soft_tokens: int | None = None) -> ProcessedImage:
        Image = _pil()
        image = to_rgb(image)
        h, w = self.target_size(image.height, image.width, soft_tokens)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=Image.BICUBIC)
        # ×1/255 in float64, then float32, as transformers rescales
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float64) * (1 / 255)).float()
        patches, positions = patchify(pixels, self.patch_size)
        return ProcessedImage(patches, positions, patches.shape[0] // self.pooling_kernel_size**2, (h, w))

    def max_patches(self, soft_tokens: int | None = None) -> int:
        return check_tier(soft_tokens or self.default_soft_tokens) * self.pooling_kernel_size**2


def pad_batch(images: list[ProcessedImage], max_patches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images into (pixel_values [B, P, 3·p²], positions [B, P, 2]), right-padding each to P patches
    (the longest image, or `max_patches` as transformers pads to a tier's k²·T) with zero rows at (-1, -1)."""
    longest = max(im.pixel_values.shape[0] for im in images)
    length = max_patches if max_patches is not None else longest
    if length < longest:
        raise RequestError(f"an image has {longest} patches, more than max_patches={length}")
    pixels = torch.zeros(len(images), length, images[0].pixel_values.shape[1])
    positions = torch.full((len(images), length, 2), -1, dtype=torch.long)
    for i, im in enumerate(images):
        n = im.pixel_values.shape[0]
        pixels[i, :n], positions[i, :n] = im.pixel_values, im.positions
    return pixels, positions
