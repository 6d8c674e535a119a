"""Image preprocessing shared by training and every front end (CLI, Serve app, backfill).

Inference: decode -> composite transparency on white -> pad to a white square (Danbooru images are
letterboxed, and a stretched face is a different face) -> resize to the model's input size ->
normalize with the mean/std from the checkpoint's config. Training augmentation is a separate step
that runs on the decoded image before the same tensor conversion.

Limits on untrusted input live here and only here: ``MAX_IMAGE_BYTES`` and ``MAX_PIXELS``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_IMAGE_BYTES = 32 << 20  # encoded size accepted from an upload or an archive
MAX_PIXELS = 50_000_000  # decoded width x height; more is refused before decoding (bombs)
WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An input that cannot become a model input. ``reason`` is a short code for dead letters:
    ``empty``, ``too_large``, ``not_an_image``, ``decompression_bomb``, ``truncated``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """Encoded bytes -> RGB image, transparency composited on white. Raises :class:`ImageError`."""
    if not data:
        raise ImageError("empty")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes > {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise ImageError("decompression_bomb", f"{w}x{h} pixels > {max_pixels}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decompression_bomb", str(e)[:100]) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # PIL's ways of saying "truncated/corrupt"
        raise ImageError("truncated", str(e)[:100]) from None
    if w == 0 or h == 0:
        raise ImageError("empty", "zero-sized image")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (Danbooru's transparent PNGs are drawn
    for a white page)."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        canvas = Image.new("RGB", img.size, WHITE)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    if img.mode != "RGB":
        if img.mode.startswith("I"):  # 16/32-bit greyscale: scale to 8 bits first
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray((255 * arr / max(arr.max(), 1)).astype(np.uint8))
        img = img.convert("RGB")
    return img


def pad_to_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_tensor(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB image -> normalized (3, size, size) float tensor."""
    img = pad_to_square(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class Preprocessor:
    """The inference transform of one model: bytes or PIL image -> tensor."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    @classmethod
    def from_config(cls, cfg) -> Preprocessor:
        return cls(cfg.image_size, cfg.mean, cfg.std)

    def __call__(self, image: bytes | Image.Image) -> torch.Tensor:
        img = decode(image) if isinstance(image, bytes | bytearray | memoryview) else to_rgb(image)
        return to_tensor(img, self.image_size, self.mean, self.std)

    def batch(self, images: Sequence[bytes | Image.Image]) -> torch.Tensor:
        return torch.stack([self(im) for im in images])


class TrainAugment:
    """Training-time augmentation, on the decoded RGB image: a mild random crop (at least
    ``min_scale`` of each side) and horizontal flips. No hue changes: hair and eye colours are what
    identify a character."""

    def __init__(self, min_scale: float = 0.8, flip: bool = True, seed: int | None = None):
        self.min_scale, self.flip = min_scale, flip
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s = self.rng.uniform(self.min_scale, 1.0)
        cw, ch = max(1, round(w * s)), max(1, round(h * s))
        x, y = int(self.rng.integers(0, w - cw + 1)), int(self.rng.integers(0, h - ch + 1))
        img = img.crop((x, y, x + cw, y + ch))
        if self.flip and self.rng.random() < 0.5:
            img = ImageOps.mirror(img)
        return img
