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
- ``too_complex``: the file's structure would cost more to parse than a real encoder's file does: more
  JPEG scans or segments, PNG chunks, GIF sub-blocks before the first image, or RLE BMP bytes than the
  structure budget below allows. Read from the bytes, before any decoder sees them.
- ``too_costly``: decoding ran over the per-image budget of CPU time or memory (``DECODE_CPU_S``,
  ``DECODE_MEMORY_MB``, or the ``DECODE_WALL_S`` backstop), so the worker process doing it was killed
  (:mod:`model.decode_pool`; in-process decoding has no such budget).
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

Structure budget, read from the bytes before any decoder sees them (``too_complex``). What a file costs
is not only its pixels: Pillow parses a JPEG's header, a PNG's chunks and a GIF's blocks before its first
image in Python, one unit at a time (1-3 us each), and libjpeg passes over every coefficient once per
progressive scan. So the units a file may hold are bounded where real encoders stay far below: at most
``JPEG_MAX_SCANS`` scans and ``JPEG_MAX_SEGMENTS`` marker segments (restart markers inside the entropy
data are not segments) and ``JPEG_MAX_HEADER_JUNK`` stray bytes between the header's segments; at most
``PNG_MAX_CHUNKS`` chunks; at most ``GIF_MAX_HEADER_BLOCKS`` extension sub-blocks and stray bytes before a
GIF's first image (its image data, and any later frame, is read by the C decoder or not at all); an RLE
BMP (decoded in Python by Pillow) at most ``BMP_RLE_MAX_BYTES``. A decode then costs at most a bounded
multiple of its pixels (100 passes for a JPEG) plus a bounded number of units. WebP needs no bound of its
own: libwebp parses its chunks in C (200,000 frames: 0.03 s). The scan uses C-speed searches (``re``,
``bytes`` slices) and visits at most the bounded units in Python: at most about 0.3 s for any 32 MiB file.

Decode budget (``too_costly``), for what the structure budget cannot see: :mod:`model.decode_pool` decodes
each image in a worker process limited to ``DECODE_CPU_S`` of CPU time (RLIMIT_CPU, per image) and
``DECODE_MEMORY_MB`` of address space above its start (RLIMIT_AS), with a ``DECODE_WALL_S`` backstop; a
worker that runs over is killed and replaced. The costliest legitimate images (50 Mpx progressive JPEGs)
take 1.0 s of CPU and up to +385 MB on the 2-core development machine.

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
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:  # torch only where tensors are made: decode workers import this module without it
    import torch

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

# Structure budget (too_complex). Measured costs are Pillow 13's on the 2-core development machine.
# libjpeg's progressive mode writes 10 scans (6 for greyscale), baseline 1 (3 if not interleaved); 100 scans
# cost libjpeg at most ~0.35 s at the 50 Mpx cap (each scan is a pass over the coefficients: a 16 Mpx file
# of 1,000 tiny scans takes 1.1 s; nvImageCodec's own default cap is 256)
JPEG_MAX_SCANS = 100
# every marker segment outside the entropy data (APPn, DQT, DHT, SOS...): a 32 MiB file holds at most 512
# full 64 KiB segments (a big ICC profile or XMP packet), plus a DHT per scan; Pillow parses those before
# the first scan in Python at ~1.4 us each (2 M empty APP markers: 2.7 s)
JPEG_MAX_SEGMENTS = 1000
JPEG_MAX_HEADER_JUNK = 64 << 10  # stray or fill bytes between the header's segments: Pillow skips them one by one
# libpng writes image data in 8 KiB IDAT chunks (4,096 in a 32 MiB file); an APNG adds 2-3 chunks a frame.
# Pillow reads each chunk in Python at ~2 us, at open and again when decoding (2.5 M empty chunks: 5.5 s)
PNG_MAX_CHUNKS = 20_000
# what Pillow reads one at a time in Python before a GIF's first image (~0.4 us each): extension sub-blocks
# and stray bytes. A 1 MB XMP packet is ~12,000 sub-blocks; a comment of 16 M one-byte blocks took 6.9 s.
# Image data sub-blocks need no bound: the C decoder reads 16 M one-byte blocks of a 12 Mpx frame in 0.1 s
GIF_MAX_HEADER_BLOCKS = 16_384
# Pillow decodes RLE4/RLE8 BMPs in Python, ~0.3 us per 2-byte command (a 32 MB file of 16 M one-pixel
# runs: 4.5 s); 4 MiB is about 0.6 s, and far more than real RLE images (icons, screenshots) hold
BMP_RLE_MAX_BYTES = 4 << 20

# Decode budget (too_costly), enforced by model.decode_pool's worker processes. The costliest legitimate
# images the pixel budget allows, measured at the 1024 px input on the 2-core development machine: a 50 Mpx
# progressive 4:4:4 JPEG (15 MB) 1.0 s of CPU and +290 MB of address space, the same in CMYK 0.8 s and
# +385 MB, a 50 Mpx RGBA PNG 0.8 s and +210 MB.
DECODE_CPU_S = 3  # whole seconds (RLIMIT_CPU counts seconds, so a job gets 3 to 4 s): 3x the costliest real one
DECODE_MEMORY_MB = 1024  # address space above the worker's own at start: 2.6x the most a real image took
DECODE_WALL_S = 15.0  # a worker shares the cores with the model and other workers; past this it is stuck

REASONS = ("empty", "too_large", "not_an_image", "decompression_bomb", "too_complex", "truncated", "too_small",
           "too_costly", "undecodable")

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
    :data:`REASONS`; the message adds a short ``detail``. ``declared`` is the (width, height) the header
    declared when the refusal came after reading it (the HTTP API counts a request's pixels by it)."""

    def __init__(self, reason: str, detail: str = "", declared: tuple[int, int] | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.declared = reason, detail, declared

    def __reduce__(self):  # picklable with its fields (Ray, worker processes)
        return type(self), (self.reason, self.detail, self.declared)


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


# -- the structure budget: units counted from the bytes (C-speed searches; Python visits only bounded units) --
# A JPEG marker outside entropy-coded data: 0xFF then a code that is not stuffing (00), a restart marker
# (D0-D7) or fill (FF). In entropy data every 0xFF is followed by 00 or a restart marker, so the first match
# after a scan's header is the end of its data.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RSTn: no length field
_GIF_BLOCK = re.compile(rb"[!,;]")  # what Pillow looks for between a GIF's blocks: extension, image, trailer


def _too_complex(what: str, count: int, limit: int) -> ImageError:
    return ImageError("too_complex", f"{what}: more than {limit}" if count > limit else f"{what}: {count}")


def _check_jpeg(data: bytes) -> None:
    """Segments, scans and the header's stray bytes of a JPEG, walked from marker to marker: a segment is
    skipped by its length, a scan's entropy data by one search for the next marker."""
    n, pos, segments, scans, junk, header = len(data), 2, 0, 0, 0, True
    while pos + 1 < n:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):  # not at a marker: stray bytes or fill
            # before the first scan Pillow skips them a byte at a time: look no further than the limit
            end = pos + JPEG_MAX_HEADER_JUNK - junk + 2 if header else n
            found = _JPEG_MARKER.search(data, pos, end)
            if found is None and end >= n:
                return  # no further marker: the decoder says what is wrong
            junk += (found.start() if found else end) - pos if header else 0
            if junk > JPEG_MAX_HEADER_JUNK:
                raise _too_complex("JPEG stray bytes between segments", junk, JPEG_MAX_HEADER_JUNK)
            pos = found.start()
        code = data[pos + 1]
        if code == _JPEG_EOI:
            return
        segments += 1
        if segments > JPEG_MAX_SEGMENTS:
            raise _too_complex("JPEG marker segments", segments, JPEG_MAX_SEGMENTS)
        if code in _JPEG_STANDALONE:
            pos += 2
            continue
        pos += 2 + max(2, int.from_bytes(data[pos + 2 : pos + 4], "big"))
        if code == _JPEG_SOS:
            scans, header = scans + 1, False
            if scans > JPEG_MAX_SCANS:
                raise _too_complex("JPEG scans", scans, JPEG_MAX_SCANS)
            found = _JPEG_MARKER.search(data, pos)  # the end of this scan's entropy data
            if found is None:
                return
            pos = found.start()


def _check_png(data: bytes) -> None:
    """The chunks of a PNG up to IEND, each skipped by its length."""
    n, pos, chunks = len(data), 8, 0
    while pos + 8 <= n:
        chunks += 1
        if chunks > PNG_MAX_CHUNKS:
            raise _too_complex("PNG chunks", chunks, PNG_MAX_CHUNKS)
        if data[pos + 4 : pos + 8] == b"IEND":
            return
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")


def _check_gif(data: bytes) -> None:
    """What Pillow reads in Python before a GIF's first image: extension sub-blocks (runs of sub-blocks of
    one length are skipped with a strided slice, in C) and stray bytes between blocks."""
    n, units, limit = len(data), 0, GIF_MAX_HEADER_BLOCKS
    pos = 13 + (3 << ((data[10] & 7) + 1) if n > 10 and data[10] & 0x80 else 0)  # header, global colour table
    while pos < n:
        kind = data[pos]
        if kind in (0x2C, 0x3B):  # the first image (its data goes to the C decoder) or the trailer
            return
        if kind != 0x21:  # stray bytes: Pillow reads them one at a time (so look no further than the limit)
            found = _GIF_BLOCK.search(data, pos, pos + limit - units + 1)
            units += (found.start() if found else min(n, pos + limit - units + 1)) - pos
            if units > limit:
                raise _too_complex("GIF stray bytes and sub-blocks before the first image", units, limit)
            if found is None:
                return  # the file ends
            pos = found.start()
            continue
        pos += 2  # "!" and the extension's label
        while pos < n and (size := data[pos]):
            step, look = size + 1, 64  # look at the next 64 sub-blocks' sizes, then 4 times as many...
            while True:
                run = data[pos : pos + step * min(look, limit - units + 1) : step]
                same = len(run) - len(run.lstrip(bytes((size,))))  # consecutive sub-blocks of this size
                units, pos = units + same, pos + step * same
                if units > limit:
                    raise _too_complex("GIF sub-blocks before the first image", units, limit)
                if same < len(run) or pos >= n:
                    break
                look *= 4
        pos += 1  # the terminating empty sub-block


def _check_bmp(data: bytes) -> None:
    compression = int.from_bytes(data[30:34], "little") if len(data) >= 34 else 0
    if compression in (1, 2) and len(data) > BMP_RLE_MAX_BYTES:  # RLE8, RLE4
        raise ImageError("too_complex", f"RLE BMP of {len(data)} bytes > {BMP_RLE_MAX_BYTES}")


def check_structure(data: bytes) -> None:
    """Refuse (``too_complex``) a file whose structure would cost more to parse than the structure budget
    allows (see the module's doc), from its bytes alone: nothing is parsed by a decoder."""
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data)
    elif data[:2] == b"BM":
        _check_bmp(data)


def _check_pixels(w: int, h: int, decoded: int, n_bytes: int, max_pixels: int) -> None:
    """Refuse ``w x h`` declared pixels that cost ``decoded`` in the budget, from ``n_bytes`` bytes."""
    if w <= 0 or h <= 0:
        raise ImageError("empty", "zero-sized image")
    if w * h > max_pixels:
        raise ImageError("decompression_bomb", f"{w}x{h} pixels > {max_pixels}", (w, h))
    if decoded > (budget := pixel_budget(n_bytes, max_pixels)):
        raise ImageError("decompression_bomb", f"{w}x{h}: {decoded} pixels from {n_bytes} bytes > {budget}", (w, h))


def _window(w: int, h: int, orientation: int) -> tuple[int, int, int, int]:
    """The aspect rule's window of a stored ``w x h`` image shown turned by ``orientation``, in stored
    coordinates; a short side under ``MIN_SIDE`` is refused."""
    shown = (h, w) if orientation >= 5 else (w, h)
    if min(w, h) < MIN_SIDE:
        raise ImageError("too_small", f"{shown[0]}x{shown[1]}: short side < {MIN_SIDE}", (w, h))
    return _stored_box(aspect_box(*shown), orientation, w, h)


def _check_webp(declared: tuple[int, int], n_bytes: int, max_pixels: int) -> None:
    _check_pixels(*declared, WEBP_PIXEL_COST * declared[0] * declared[1], n_bytes, max_pixels)


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, int, tuple[int, int, int, int], bool]:
    """Open ``data`` (its header only) and refuse what decoding it would cost too much of: returns the
    image, its EXIF orientation, the window to decode in stored coordinates, and whether that window
    is a PNG's top rows (decoding can stop at its bottom)."""
    if declared := _webp_size(data):  # libwebp allocates the canvas on open: its header is checked first
        _check_webp(declared, len(data), max_pixels)
    check_structure(data)  # before Pillow parses anything: its header parsers are Python
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


def _header(data: bytes, max_pixels: int, max_bytes: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The stored (width, height) a header declares and the window decode would keep, after every check
    decode makes before decoding."""
    _check_bytes(data, max_bytes)  # inside the guard: a value that is not bytes is an ImageError too
    if declared := _webp_size(data):  # not opened: PIL would allocate a WebP's canvas
        _check_webp(declared, len(data), max_pixels)
        return declared, _window(*declared, 1)  # a turn by EXIF orientation swaps the sides, not the long one
    img, _, box, _ = _open_checked(data, max_pixels)
    return img.size, box


def long_side(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> int:
    """The long side, px, of what :func:`decode` would return (the aspect rule applied), read from the
    header alone: nothing is decoded. Refuses, with the same :class:`ImageError`, all that
    :func:`decode` refuses before decoding: empty, too large, too small, not an accepted format, too
    complex a structure, more pixels than the budget allows for the file's size. What only decoding finds
    (a broken body under a good header) it does not see."""

    def read() -> int:
        _, box = _header(data, max_pixels, max_bytes)
        return max(box[2] - box[0], box[3] - box[1])

    return _guarded(read)


def declared_size(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[int, int]:
    """The stored (width, height) the header declares, refusing all that :func:`long_side` refuses; when
    the refusal came after the header was read, the :class:`ImageError`'s ``declared`` holds the size.
    Nothing is decoded (the HTTP API's check before it sends an image to the model)."""
    return _guarded(lambda: _header(data, max_pixels, max_bytes)[0])


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


def to_array(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Image -> normalized (3, size, size) float32 array: shrunk (or enlarged) so the long side is
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
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, H, W)


def to_tensor(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """:func:`to_array` as a torch tensor."""
    import torch

    return torch.from_numpy(to_array(img, size, mean, std))


class Preprocessor:
    """The inference transform of one model: bytes or PIL image -> tensor (or, with :meth:`array`, the same
    numbers as a numpy array: what a decode worker sends back). Raises only :class:`ImageError`."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    @classmethod
    def from_config(cls, cfg) -> Preprocessor:
        return cls(cfg.image_size, cfg.mean, cfg.std)

    def __call__(self, image: bytes | Image.Image) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.array(image))

    def array(self, image: bytes | Image.Image) -> np.ndarray:
        """(3, S, S) float32."""
        if isinstance(image, bytes | bytearray | memoryview):
            img = decode(image, self.image_size)
            return _guarded(lambda: to_array(img, self.image_size, self.mean, self.std))
        return _guarded(lambda: self._from_pil(image))

    def _from_pil(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        if w <= 0 or h <= 0:
            raise ImageError("empty", "zero-sized image")
        if min(w, h) < MIN_SIDE:
            raise ImageError("too_small", f"{w}x{h}: short side < {MIN_SIDE}")
        box = aspect_box(w, h)
        img = _region_rgb(image, box, _shrink_factor(box, self.image_size))
        return to_array(img, self.image_size, self.mean, self.std)

    def batch(self, images: Sequence[bytes | Image.Image]) -> torch.Tensor:
        import torch

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
