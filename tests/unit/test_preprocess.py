"""Preprocessing of everything users upload: modes, sizes, letterboxing, and hostile input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import MAX_PIXELS, ImageError, Preprocessor, TrainAugment, decode, pad_to_square

MEAN = STD = (0.5, 0.5, 0.5)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def white_after_normalize(t: torch.Tensor) -> bool:
    return torch.allclose(t, torch.ones_like(t), atol=0.02)  # (1 - 0.5) / 0.5


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((8, 8), (0, 0, 255, 255))
    rgb = decode(encode(img))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((8, 8)) == (0, 0, 255)


def test_palette_with_transparency_and_greyscale_modes():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    pal.info["transparency"] = 0
    assert decode(encode(pal)).getpixel((1, 1)) == (255, 255, 255)
    assert decode(encode(Image.new("L", (8, 8), 77))).getpixel((0, 0)) == (77, 77, 77)
    assert decode(encode(Image.new("LA", (8, 8), (77, 0)))).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert decode(encode(sixteen)).getpixel((0, 0)) == (255, 255, 255)
    assert decode(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG")).mode == "RGB"


def test_letterboxed_images_are_padded_not_stretched():
    img = Image.new("RGB", (40, 10), (0, 0, 0))
    sq = pad_to_square(img)
    assert sq.size == (40, 40)
    assert sq.getpixel((20, 0)) == (255, 255, 255) and sq.getpixel((20, 20)) == (0, 0, 0)
    t = Preprocessor(32, MEAN, STD)(encode(img))
    assert t.shape == (3, 32, 32)
    assert white_after_normalize(t[:, :4, :]) and white_after_normalize(t[:, -4:, :])  # white bars
    assert torch.allclose(t[:, 16, 16], torch.full((3,), -1.0), atol=0.02)  # black content


@pytest.mark.parametrize("size", [(1, 1), (3, 700), (2000, 1500)])
def test_tiny_and_large_images(size):
    t = Preprocessor(32, MEAN, STD)(encode(Image.new("RGB", size, (10, 200, 30)), "PNG"))
    assert t.shape == (3, 32, 32) and torch.isfinite(t).all()


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (8000, 8000)), "PNG")  # 64 Mpx in a few KB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError) as err:
        decode(bomb)
    assert err.value.reason == "decompression_bomb" and MAX_PIXELS < 8000 * 8000


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"GIF89a this is not really a gif", "not_an_image"),  # a header PIL cannot parse
        (b"hello world, not an image", "not_an_image"),
        (b"x" * (33 << 20), "too_large"),
    ],
)
def test_bad_bytes_have_reason_codes(data, reason):
    with pytest.raises(ImageError) as err:
        decode(data)
    assert err.value.reason == reason


def test_truncated_jpeg():
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageError) as err:
        decode(data[: len(data) // 2])
    assert err.value.reason == "truncated"


def test_train_augment_is_separate_and_mild():
    img = Image.new("RGB", (100, 50), (0, 128, 0))
    aug = TrainAugment(min_scale=0.8, seed=0)
    sizes = {aug(img).size for _ in range(20)}
    assert len(sizes) > 1 and all(80 <= w <= 100 and 40 <= h <= 50 for w, h in sizes)
    assert aug(img).getpixel((0, 0)) == (0, 128, 0)  # colours untouched: they identify characters
    # inference is deterministic
    p = Preprocessor(16, MEAN, STD)
    assert torch.equal(p(img), p(img))
