"""The image processor against transformers 5.23's `Gemma4ImageProcessorPil` (the Pillow twin of
`Gemma4ImageProcessor`; torchvision is not installed here): sizes, soft-token counts, patch order, (x, y)
positions and padding at every tier, and pixel values (exactly equal: both resize with Pillow's bicubic)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch

from letterpress.config import IMAGE_TIERS
from letterpress.errors import RequestError
from letterpress.media.image import ImageProcessor, pad_batch, target_size

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

# (width, height)
SHAPES = {"square": (300, 300), "wide": (640, 200), "tall": (150, 500), "tiny": (7, 5), "sliver": (400, 3)}


def picture(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise, so that resampling differences would show
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    return image


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("transformers")
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil()


@pytest.mark.parametrize("tier", IMAGE_TIERS)
def test_equals_transformers_at_every_tier(reference, tier):
    ours = ImageProcessor()
    for name, (w, h) in SHAPES.items():
        image = picture(w, h, seed=w)
        expected = reference(image, max_soft_tokens=tier, return_tensors="pt")
        got = ours(image, soft_tokens=tier)
        assert got.num_soft_tokens == int(expected["num_soft_tokens_per_image"][0]), name
        assert got.num_soft_tokens <= tier
        assert ours.num_soft_tokens(h, w, tier) == got.num_soft_tokens
        pixels, positions = pad_batch([got], max_patches=ours.max_patches(tier))
        assert positions.shape == expected["image_position_ids"].shape
        assert torch.equal(positions, expected["image_position_ids"]), name
        assert pixels.dtype == expected["pixel_values"].dtype == torch.float32
        assert torch.equal(pixels, expected["pixel_values"]), name


def test_default_tier_batches_and_transparency(reference):
    """Two images of different sizes in one call (padded to the tier's patches); an RGBA image is composited
    onto white; the default tier is 280 (or the config's)."""
    ours = ImageProcessor()
    images = [picture(320, 240, seed=1, mode="RGBA"), picture(90, 400, seed=2)]
    expected = reference(images, return_tensors="pt")
    got = [ours(im) for im in images]
    assert [g.num_soft_tokens for g in got] == expected["num_soft_tokens_per_image"].tolist()
    pixels, positions = pad_batch(got, max_patches=ours.max_patches())
    assert torch.equal(positions, expected["image_position_ids"])
    assert torch.equal(pixels, expected["pixel_values"])
    assert ImageProcessor(default_soft_tokens=70).max_patches() == 630


def test_resize_rule_equals_transformers_on_a_grid_of_sizes():
    pytest.importorskip("transformers")
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    sizes = [1, 2, 5, 16, 47, 48, 49, 100, 333, 480, 1000, 1080, 1920, 4000, 12000]
    for tier in IMAGE_TIERS:
        for h in sizes:
            for w in sizes:
                expected = get_aspect_ratio_preserving_size(h, w, 16, tier * 9, 3)
                assert target_size(h, w, tier) == expected, (h, w, tier)


def test_documented_counts():
    """The reference digest's table (run on transformers): a 896² square and a 1920×1080 frame per tier."""
    ours = ImageProcessor()
    square = [ours.num_soft_tokens(896, 896, t) for t in IMAGE_TIERS]
    frame = [ours.num_soft_tokens(1080, 1920, t) for t in IMAGE_TIERS]
    assert square == [64, 121, 256, 529, 1089]
    assert frame == [66, 120, 264, 527, 1100]
    assert ours.target_size(1080, 1920, 280) == (576, 1056)


def test_patch_layout():
    """Patch (gx, gy) holds pixels [gy·p:(gy+1)·p, gx·p:(gx+1)·p], flattened (py, px, c) with c fastest."""
    ours = ImageProcessor(patch_size=4, pooling_kernel_size=2, default_soft_tokens=70)
    image = picture(8 * 4, 4 * 4, seed=9)  # 280 patches allowed: kept at 32×16 (multiples of 8)
    got = ours(image, soft_tokens=70)
    assert got.size[0] % 8 == 0 and got.size[1] % 8 == 0
    arr = np.asarray(image.resize((got.size[1], got.size[0]), Image.BICUBIC)
                     if got.size != (16, 32) else image, dtype=np.float64) / 255
    grid_w = got.size[1] // 4
    for i in (0, 1, grid_w, len(got.positions) - 1):
        x, y = got.positions[i].tolist()
        assert (x, y) == (i % grid_w, i // grid_w)
        block = arr[y * 4:(y + 1) * 4, x * 4:(x + 1) * 4, :].reshape(-1)
        assert np.allclose(got.pixel_values[i].numpy(), block, atol=1e-7)


def test_inputs_and_errors(tmp_path):
    ours = ImageProcessor()
    image = picture(64, 48)
    path = tmp_path / "a.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    a = ours(image)
    for other in (path, str(path), buffer.getvalue(), np.asarray(image)):
        assert torch.equal(ours(other).pixel_values, a.pixel_values)
    with pytest.raises(RequestError, match="tier"):
        ours(image, soft_tokens=100)
    with pytest.raises(RequestError, match="tier"):
        ImageProcessor(default_soft_tokens=256)
    with pytest.raises(RequestError, match="not found"):
        ours(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(RequestError, match="cannot read"):
        ours(tmp_path / "bad.png")
    with pytest.raises(RequestError, match="uint8"):
        ours(np.zeros((4, 4), dtype=np.float32))


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width×height (RGBA) but holds a few bytes of pixels: its size without the memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_an_image_over_the_pixel_cap_is_refused_before_decoding(monkeypatch):
    """Under Pillow's bomb limits (a 13000×13000 PNG took ~2.6 GB to decode and composite): the header suffices."""
    from PIL import ImageFile

    def never(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(RequestError, match="the image is 9000×9000 pixels \\(81 megapixels\\), more than the "
                                           "limit of 50 megapixels"):
        ImageProcessor()(png_header(9000, 9000))
