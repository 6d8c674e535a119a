"""Image preprocessing shared by training and every front end (CLI, Serve app, backfill).

Inference: decode (bounded, see below) -> crop extreme aspect ratios -> shrink so the long side is the
model's input size -> composite transparency on white -> pad to a white square (Danbooru images are
letterboxed, and a stretched face is a different face) -> normalize with the mean/std from the
checkpoint's config. Training augmentation is a separate step that runs on the decoded image before
the same tensor conversion (:func:`to_tensor`).

Untrusted input. The bytes come from the internet; the rule is that decoding and preprocessing never
allocate more than a bounded multiple of the input size (with a small constant floor), and that no input
makes them raise anything but :class:`ImageError`, whose ``reason`` is one of :data:`REASONS`:

- ``empty``: no bytes, or a zero-sized image.
- ``too_large``: more than ``MAX_IMAGE_BYTES`` (32 MiB) of encoded bytes.
- ``not_an_image``: not one of ``ACCEPTED_FORMATS`` (JPEG, PNG, WebP, GIF, BMP: Danbooru's formats).
  Other formats are never even parsed (no TIFF, ICO, SVG, PDF; no EPS, which would run ghostscript).
- ``decompression_bomb``: more pixels than the pixel budget below.
- ``too_small``: the short side is below ``MIN_SIDE`` (8) pixels (a 1 x 1 dot, a 2 x 2,000,000 line).
- ``truncated``: the data ends before the image does.
- ``undecodable``: anything else that goes wrong with one image (corrupt data, a decoder error, even
  ``MemoryError``); ``str(error)`` then holds the exception's class and a short message.

Pixel budget, read from the header before anything is decoded: an image may declare at most
``MAX_PIXELS`` (50 Mpx), and the pixels the decoder will produce may be at most
``max(PIXEL_FLOOR, PIXELS_PER_BYTE x encoded bytes)``, that is max(16 Mpx, 64 pixels per byte of file),
and never more than 50 Mpx. Any image up to 16 Mpx (5000 x 3200) passes whatever its file size; above
that, a file must carry at least one byte per 64 pixels. Photos (2-8 px/byte as JPEG), line art and
illustrations (5-40 px/byte as PNG) pass; a PNG of a few KB that declares 36 Mpx (deflate reaches
~1000:1) does not. What is counted: a PNG that is not interlaced is decoded only down to the bottom of
the window kept by the aspect rule, so only those rows count; a JPEG counts its full declared size even
though it is decoded with DCT scaling (``Image.draft``, 1/2 to 1/8) when the model needs fewer pixels
(a progressive JPEG buffers every coefficient); a WebP pixel counts ``WEBP_PIXEL_COST`` (4), because
libwebp holds two RGBA canvases and PIL a copy (so WebP tops out at 12.5 Mpx). Working memory is then
at most about 5 bytes per counted pixel: about 80 MB at the floor, 250 MB at the cap (measured: 70 MB
for a 16 Mpx RGBA PNG, 190 MB for a 12 Mpx WebP).

Aspect rule: an image whose long side is more than ``MAX_ASPECT`` (2.5) times its short side is cropped
to a window of exactly that aspect before anything else: the top of a tall image (a webtoon strip's
first panel), the centre of a wide one. The window is taken in the displayed orientation (after EXIF
rotation). The short side is kept, so the window is 2.5 x short side long; a short side under
``MIN_SIDE`` is ``too_small``. So a 600 x 40,000 strip is tagged on its top 600 x 1,500 pixels.

Then the window is shrunk: first by an integer factor (box filter, in horizontal strips of about a
megapixel, converting palette, 1-bit, 16-bit, CMYK and transparent modes strip by strip, so no
full-size RGB or float copy is ever made), then with a bicubic resample to the exact size, and the
result is padded to a white square. Orientation from EXIF (JPEG, WebP, and PNG when the eXIf chunk
comes before the image data) is applied to the shrunk image. Animated GIF, WebP and PNG give their
first frame. 16-bit greyscale maps 0..65535 to 0..255; 32-bit integer images (only handed in as PIL
images) are scaled so their maximum is white, float images are read as 0..1 if their maximum is at most
1, else as 0..255.

Limits on untrusted input live here and only here.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_IMAGE_BYTES = 32 << 20  # encoded size accepted from an upload or an archive
MAX_PIXELS = 50_000_000  # declared width x height; more is refused before decoding (bombs)
PIXEL_FLOOR = 16_000_000  # any image up to this many pixels passes the per-byte budget
PIXELS_PER_BYTE = 64  # above the floor, decoded pixels per encoded byte allowed
MAX_ASPECT = 2.5  # long side / short side; longer images are cropped (top of tall, centre of wide)
MIN_SIDE = 8  # a shorter short side is refused as too_small
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # PIL format ids; nothing else is parsed
WEBP_PIXEL_COST = 4  # a WebP pixel counts 4 in the budget: libwebp holds two RGBA canvases, PIL a copy
STRIP_PIXELS = 1 << 20  # mode conversion and shrinking work on strips of about this many pixels
WHITE = (255, 255, 255)

REASONS = ("empty", "too_large", "not_an_image", "decompression_bomb", "truncated", "too_small", "undecodable")

# EXIF orientation -> the transpose that displays the stored pixels upright (as ImageOps.exif_transpose)
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")

T = TypeVar("T")


class ImageError(ValueError):
    """An input that cannot become a model input. ``reason`` is a short code for dead letters, one of
    :data:`REASONS`; the message adds a short detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _as_image_error(e: Exception) -> ImageError:
    """Whatever one image raised -> an :class:`ImageError` with a reason code."""
    if isinstance(e, ImageError):
        return e
    msg = str(e)[:100]
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return ImageError("decompression_bomb", msg)
    if isinstance(e, Image.UnidentifiedImageError):
        return ImageError("not_an_image", "not " + ", ".join(ACCEPTED_FORMATS))
    if isinstance(e, EOFError) or (isinstance(e, OSError) and "truncated" in msg.lower()):
        return ImageError("truncated", msg)
    return ImageError("undecodable", f"{type(e).__name__}: {msg}")


def _guarded(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except Exception as e:  # MemoryError, struct.error, ZeroDivisionError... one image never fails a batch
        raise _as_image_error(e) from None


def pixel_budget(n_bytes: int, max_pixels: int = MAX_PIXELS) -> int:
    """The most pixels a file of ``n_bytes`` encoded bytes may decode into."""
    return min(max_pixels, max(PIXEL_FLOOR, PIXELS_PER_BYTE * n_bytes))


def aspect_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The window the aspect rule keeps of a ``width x height`` image: all of it up to ``MAX_ASPECT``,
    else the top of a tall image or the centre of a wide one, of aspect exactly ``MAX_ASPECT``."""
    if height > MAX_ASPECT * width:
        return 0, 0, width, max(1, int(MAX_ASPECT * width))
    if width > MAX_ASPECT * height:
        keep = max(1, int(MAX_ASPECT * height))
        x0 = (width - keep) // 2
        return x0, 0, x0 + keep, height
    return 0, 0, width, height


def _stored_box(box: tuple[int, int, int, int], orientation: int, w: int, h: int) -> tuple[int, int, int, int]:
    """A box in displayed coordinates -> the same pixels in stored coordinates (``w x h`` stored)."""

    def inv(x: int, y: int) -> tuple[int, int]:  # displayed point -> stored point (continuous coordinates)
        return {1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y), 5: (y, x), 6: (y, h - x),
                7: (w - y, h - x), 8: (w - y, x)}[orientation]  # fmt: skip

    (ax, ay), (bx, by) = inv(box[0], box[1]), inv(box[2], box[3])
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation from what the header parse already holds (never decodes pixels: PIL's
    ``getexif`` on a PNG would load the whole image to look for a late eXIf chunk)."""
    raw = img.info.get("exif")
    if not raw or not isinstance(raw, bytes):
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(0x0112, 1)
    except Exception:  # a broken EXIF block is no reason to refuse the picture
        return 1
    return value if isinstance(value, int) and value in _ORIENT else 1


def _level(img: Image.Image) -> float:
    """For 32-bit integer and float images: the factor that maps values to 0..255."""
    if img.mode == "I":
        return 255.0 / max(float(img.getextrema()[1]), 1.0)
    if img.mode == "F":
        hi = img.getextrema()[1]
        return 255.0 if hi is not None and float(hi) <= 1.0 else 1.0
    return 1.0


def _strip_to_rgb(part: Image.Image, level: float) -> Image.Image:
    """One strip of any mode -> RGB, transparency composited on white."""
    if part.mode in _SIXTEEN:
        a = np.asarray(part).astype(np.uint32)
        part = Image.fromarray(((a + 128) // 257).astype(np.uint8))
    elif part.mode in ("I", "F"):
        a = np.asarray(part, dtype=np.float32) * np.float32(level)
        part = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    elif part.mode == "La":
        part = part.convert("LA")
    if part.has_transparency_data:
        rgba = part.convert("RGBA")
        canvas = Image.new("RGB", part.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return part if part.mode == "RGB" else part.convert("RGB")


def _region_rgb(img: Image.Image, box: tuple[int, int, int, int], factor: int) -> Image.Image:
    """``box`` of ``img`` (any mode) -> RGB on white, shrunk by the integer ``factor`` (box filter).
    Works in strips, so no full-size copy is made in any mode."""
    x0, y0, x1, y1 = box
    if img.mode == "RGB" and not img.has_transparency_data:
        if factor > 1:
            return img.reduce(factor, box)
        return img if box == (0, 0, *img.size) else img.crop(box)
    bw, bh = x1 - x0, y1 - y0
    out = Image.new("RGB", (-(-bw // factor), -(-bh // factor)), WHITE)
    rows = factor * max(1, STRIP_PIXELS // (bw * factor))
    level = _level(img)
    for y in range(y0, y1, rows):
        part = _strip_to_rgb(img.crop((x0, y, x1, min(y + rows, y1))), level)
        out.paste(part.reduce(factor) if factor > 1 else part, (0, (y - y0) // factor))
    return out


def _shrink_factor(box: tuple[int, int, int, int], size: int | None) -> int:
    """The integer reduction that keeps the long side of ``box`` at least ``size``."""
    if not size:
        return 1
    return max(1, max(box[2] - box[0], box[3] - box[1]) // size)


def decode(
    data: bytes, size: int | None = None, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_IMAGE_BYTES
) -> Image.Image:
    """Encoded bytes -> RGB image, transparency composited on white, EXIF orientation applied, cropped
    by the aspect rule. With ``size`` (the model's input size) the image is also shrunk while decoding,
    by an integer factor that keeps its long side at least ``size``. Raises :class:`ImageError` and
    nothing else."""
    _check_bytes(data, max_bytes)
    return _guarded(lambda: _decode(data, size, max_pixels))


def _check_bytes(data: bytes, max_bytes: int) -> None:
    if not data:
        raise ImageError("empty")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes > {max_bytes}")


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size a WebP header declares (libwebp allocates the canvas, twice, as soon as PIL opens
    the file, so it is checked before)."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _check_pixels(w: int, h: int, decoded: int, n_bytes: int, max_pixels: int) -> None:
    """Refuse ``w x h`` declared pixels that cost ``decoded`` in the budget, from ``n_bytes`` bytes."""
    if w <= 0 or h <= 0:
        raise ImageError("empty", "zero-sized image")
    if w * h > max_pixels:
        raise ImageError("decompression_bomb", f"{w}x{h} pixels > {max_pixels}")
    if decoded > (budget := pixel_budget(n_bytes, max_pixels)):
        raise ImageError("decompression_bomb", f"{w}x{h}: {decoded} pixels from {n_bytes} bytes > {budget}")


def _window(w: int, h: int, orientation: int) -> tuple[int, int, int, int]:
    """The aspect rule's window of a stored ``w x h`` image shown turned by ``orientation``, in stored
    coordinates; a short side under ``MIN_SIDE`` is refused."""
    shown = (h, w) if orientation >= 5 else (w, h)
    if min(w, h) < MIN_SIDE:
        raise ImageError("too_small", f"{shown[0]}x{shown[1]}: short side < {MIN_SIDE}")
    return _stored_box(aspect_box(*shown), orientation, w, h)


def _check_webp(declared: tuple[int, int], n_bytes: int, max_pixels: int) -> None:
    _check_pixels(*declared, WEBP_PIXEL_COST * declared[0] * declared[1], n_bytes, max_pixels)


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, int, tuple[int, int, int, int], bool]:
    """Open ``data`` (its header only) and refuse what decoding it would cost too much of: returns the
    image, its EXIF orientation, the window to decode in stored coordinates, and whether that window
    is a PNG's top rows (decoding can stop at its bottom)."""
    if declared := _webp_size(data):  # libwebp allocates the canvas on open: its header is checked first
        _check_webp(declared, len(data), max_pixels)
    img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    w, h = img.size  # from the header: nothing decoded yet
    _check_pixels(w, h, 0, len(data), max_pixels)
    orientation = _orientation(img)
    box = _window(w, h, orientation)

    # A PNG is decoded top to bottom: when the window is the top of the image, stop at its bottom row.
    top_rows = (
        img.format == "PNG" and box[:3] == (0, 0, w) and box[3] < h and not img.info.get("interlace")
        and not getattr(img, "is_animated", False) and len(img.tile) == 1 and img.tile[0][0] == "zip"
        and tuple(img.tile[0][1]) == (0, 0, w, h)
    )  # fmt: skip
    cost = WEBP_PIXEL_COST if img.format == "WEBP" else 1
    _check_pixels(w, h, cost * w * (box[3] if top_rows else h), len(data), max_pixels)
    return img, orientation, box, top_rows


def _decode(data: bytes, size: int | None, max_pixels: int) -> Image.Image:
    img, orientation, box, top_rows = _open_checked(data, max_pixels)
    w, h = img.size
    if top_rows:
        name, _, offset, args = img.tile[0]
        img._size = (w, box[3])  # private, but the zip decoder stops when this smaller image is full
        img.tile = [type(img.tile[0])(name, (0, 0, w, box[3]), offset, args)]

    scale = min(8, _shrink_factor(box, size))
    if scale >= 2:  # JPEG: DCT scaling while decoding (a no-op for other formats)
        drafted = img.draft(None, (max(1, w // scale), max(1, h // scale)))
        if drafted is not None and img.size != (w, h):
            s = max(1, round(w / drafted[1][2]))
            box = (box[0] // s, box[1] // s, min(-(-box[2] // s), img.size[0]), min(-(-box[3] // s), img.size[1]))
    img.load()  # the first frame of an animation
    out = _region_rgb(img, box, _shrink_factor(box, size))
    return out.transpose(_ORIENT[orientation]) if orientation in _ORIENT else out


def long_side(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> int:
    """The long side, px, of what :func:`decode` would return (the aspect rule applied), read from the
    header alone: nothing is decoded. Refuses, with the same :class:`ImageError`, all that
    :func:`decode` refuses before decoding: empty, too large, too small, not an accepted format, more
    pixels than the budget allows for the file's size. What only decoding finds (a broken body under a
    good header) it does not see."""

    def read() -> int:
        _check_bytes(data, max_bytes)  # inside the guard: a value that is not bytes is an ImageError too
        if declared := _webp_size(data):  # not opened: PIL would allocate a WebP's canvas
            _check_webp(declared, len(data), max_pixels)
            box = _window(*declared, 1)  # a turn by EXIF orientation swaps the sides, not the long one
        else:
            _, _, box, _ = _open_checked(data, max_pixels)
        return max(box[2] - box[0], box[3] - box[1])

    return _guarded(read)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (Danbooru's transparent PNGs are drawn
    for a white page). An RGB image without transparency is returned as is."""
    return _region_rgb(img, (0, 0, *img.size), 1)


def crop_to_aspect(img: Image.Image) -> Image.Image:
    """The aspect rule on an image already in memory (see :func:`aspect_box`)."""
    box = aspect_box(*img.size)
    return img if box == (0, 0, *img.size) else img.crop(box)


def pad_to_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_tensor(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Image -> normalized (3, size, size) float tensor: shrunk (or enlarged) so the long side is
    ``size``, aspect kept, centred on a white square. Shrinking pads only the small image."""
    img = to_rgb(img)
    w, h = img.size
    long = max(w, h)
    if long != size:
        target = (max(1, round(w * size / long)), max(1, round(h * size / long)))
        if long // size >= 2:
            img = img.reduce(long // size)  # box filter first, as decode(size=...) does
        if img.size != target:
            img = img.resize(target, Image.Resampling.BICUBIC)
    img = pad_to_square(img)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class Preprocessor:
    """The inference transform of one model: bytes or PIL image -> tensor. Raises only
    :class:`ImageError`."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    @classmethod
    def from_config(cls, cfg) -> Preprocessor:
        return cls(cfg.image_size, cfg.mean, cfg.std)

    def __call__(self, image: bytes | Image.Image) -> torch.Tensor:
        if isinstance(image, bytes | bytearray | memoryview):
            img = decode(image, self.image_size)
            return _guarded(lambda: to_tensor(img, self.image_size, self.mean, self.std))
        return _guarded(lambda: self._from_pil(image))

    def _from_pil(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        if w <= 0 or h <= 0:
            raise ImageError("empty", "zero-sized image")
        if min(w, h) < MIN_SIDE:
            raise ImageError("too_small", f"{w}x{h}: short side < {MIN_SIDE}")
        box = aspect_box(w, h)
        img = _region_rgb(image, box, _shrink_factor(box, self.image_size))
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
