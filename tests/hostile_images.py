"""A corpus of hostile and awkward uploads, built as bytes, deterministically (no files, no fixtures).

``corpus()`` maps a name to ``(bytes, expected)``, where ``expected`` is ``"ok"`` (the image must become a
model input) or the ``model.preprocess.ImageError`` reason it must be refused with. Any suite imports it
as ``from hostile_images import corpus`` (``tests/`` is on ``sys.path``: ``tests/conftest.py`` lives there).
``mutations(data, seed)`` and its parts make damaged variants for property-based tests.

The markers the preprocessing tests look for: the tall strips are red at the top and blue at the bottom,
the wide image is red at the left end, green in the centre and blue at the right end; the animations'
first frame is red and the later frames blue; the EXIF-rotated JPEG is stored 120 x 80 with a red block in
its stored top-left corner, so displayed upright (orientation 6: rotate 90 degrees clockwise) it is
80 x 120 with the red block in the top-right corner.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SEED = 20240611


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int, idat: bytes, bit_depth: int = 8, colour: int = 0) -> bytes:
    """A PNG whose header declares ``width x height`` but whose image data is ``idat`` (raw, before
    compression): a valid file that lies about its size."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(idat, 9))
            + png_chunk(b"IEND", b""))  # fmt: skip


def jpeg_declaring(width: int, height: int) -> bytes:
    """A 64 x 64 JPEG whose frame header (SOF0) claims ``width x height``."""
    data = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def webp_declaring(width: int, height: int) -> bytes:
    """An animated 64 x 64 WebP whose VP8X header claims a ``width x height`` canvas (libwebp allocates
    the canvas as soon as the file is opened)."""
    data = animated("WEBP")
    assert data[12:16] == b"VP8X"
    return data[:24] + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little") + data[30:]


def line_png() -> bytes:
    """2 x 2,000,000 greyscale: ~6 KB that asks the old code for a 2,000,000-pixel-square canvas."""
    return encode(Image.new("L", (2, 2_000_000), 0), "PNG")


def _strip_pixels() -> np.ndarray:
    """600 x 40,000 RGB: a webtoon strip, red on top, blue at the bottom, panels and line work between."""
    rng = np.random.default_rng(SEED)
    a = np.full((40_000, 600, 3), 255, dtype=np.uint8)
    a[:300] = RED
    for top in range(400, 39_000, 1_200):  # panels with some texture
        a[top : top + 1_000, 20:580] = rng.integers(120, 200, size=3, dtype=np.uint8)
        a[top : top + 1_000 : 7, 20:580, 1] = 40
    a[-300:] = BLUE
    return a


def strip_png() -> bytes:
    return encode(Image.fromarray(_strip_pixels()), "PNG")


def strip_jpeg() -> bytes:
    return encode(Image.fromarray(_strip_pixels()), "JPEG", quality=90)


def wide_png() -> bytes:
    """40,000 x 600: red left end, green centre, blue right end, grey noise between (a panorama carries
    enough bytes for its pixels: ~1 MB, above the per-byte pixel budget)."""
    rng = np.random.default_rng(SEED + 1)
    a = np.full((600, 40_000, 3), 128, dtype=np.uint8)
    a[::4, :, 1] += rng.integers(0, 4, size=(150, 40_000), dtype=np.uint8)
    a[:, :1_000] = RED
    a[:, 19_900:20_100] = GREEN
    a[:, -1_000:] = BLUE
    return encode(Image.fromarray(a), "PNG")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in (RED, BLUE, BLUE)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (120, 80), (40, 40, 40))
    img.paste(RED, (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def palette_transparent_png() -> bytes:
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([10, 20, 30, 200, 0, 0] + [0, 0, 0] * 254)
    pal.paste(1, (8, 8, 24, 24))
    return encode(pal, "PNG", transparency=0)


def grey16_png() -> bytes:
    ramp = np.linspace(0, 65535, 64, dtype=np.float64).round().astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (64, 1))), "PNG")


def truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(SEED + 2).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    return data[: len(data) // 2]


def eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
            b"newpath 0 0 moveto 64 64 lineto stroke showpage\n%%EOF\n")  # fmt: skip


def svg() -> bytes:
    return (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
            b'<rect width="64" height="64" fill="red"/></svg>\n')  # fmt: skip


@functools.cache
def _corpus() -> tuple[tuple[str, bytes, str], ...]:
    rng = np.random.default_rng(SEED + 3)
    small = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    items = [
        ("line_2x2000000.png", line_png(), "too_small"),
        ("dot_1x1.png", encode(Image.new("RGB", (1, 1), RED), "PNG"), "too_small"),
        ("strip_600x40000.png", strip_png(), "ok"),
        ("strip_600x40000.jpg", strip_jpeg(), "ok"),
        ("wide_40000x600.png", wide_png(), "ok"),
        ("bomb_1bit_9000x6000.png", encode(Image.new("1", (9000, 6000)), "PNG"), "decompression_bomb"),
        ("bomb_1bit_6000x6000.png", encode(Image.new("1", (6000, 6000)), "PNG"), "decompression_bomb"),
        ("bomb_tall_4000x12000.png", encode(Image.new("1", (4000, 12000)), "PNG"), "decompression_bomb"),
        ("png_declares_30000x30000.png", png_declaring(30_000, 30_000, b"\0" * 30_001), "decompression_bomb"),
        # a zlib stream that ends early is accepted by PIL (missing rows stay black): fine, the floor of
        # the pixel budget bounds what it costs
        ("png_declares_4000x4000_one_row.png", png_declaring(4000, 4000, b"\0" * 4001), "ok"),
        ("png_declares_zero_width.png", png_declaring(0, 10, b"\0" * 10), "not_an_image"),
        ("jpeg_declares_5000x5000.jpg", jpeg_declaring(5000, 5000), "decompression_bomb"),
        ("jpeg_declares_65000x65000.jpg", jpeg_declaring(65_000, 65_000), "decompression_bomb"),
        ("webp_declares_16000x10000.webp", webp_declaring(16_000, 10_000), "decompression_bomb"),
        ("webp_declares_5000x5000.webp", webp_declaring(5000, 5000), "decompression_bomb"),
        ("animated.gif", animated("GIF"), "ok"),
        ("animated.webp", animated("WEBP"), "ok"),
        ("animated.png", animated("PNG"), "ok"),
        ("cmyk.jpg", encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"), "ok"),
        ("grey16.png", grey16_png(), "ok"),
        ("palette_transparent.png", palette_transparent_png(), "ok"),
        ("la.png", encode(Image.new("LA", (40, 30), (90, 128)), "PNG"), "ok"),
        ("one_bit.png", encode(Image.new("1", (40, 30), 1), "PNG"), "ok"),
        ("exif_rotated.jpg", exif_rotated_jpeg(), "ok"),
        ("photo.jpg", encode(small, "JPEG", quality=90), "ok"),
        ("photo.webp", encode(small, "WEBP"), "ok"),
        ("photo.bmp", encode(small, "BMP"), "ok"),
        ("truncated.jpg", truncated_jpeg(), "truncated"),
        ("truncated.png", encode(small, "PNG")[:5000], "truncated"),
        ("garbage_appended.jpg", encode(small, "JPEG") + rng.bytes(4096), "ok"),
        ("postscript.eps", eps(), "not_an_image"),
        ("photo.tiff", encode(small, "TIFF"), "not_an_image"),
        ("icon.ico", encode(small, "ICO"), "not_an_image"),
        ("drawing.svg", svg(), "not_an_image"),
        ("zero_bytes", b"", "empty"),
        ("random_bytes", rng.bytes(2048), "not_an_image"),
        ("gif_header_only", b"GIF89a this is not really a gif", "not_an_image"),
    ]
    return tuple(items)


def corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (encoded bytes, "ok" or the expected ImageError reason). Built once per process (the big
    items take about two seconds), then copied."""
    return {name: (data, expected) for name, data, expected in _corpus()}


def small_corpus(max_bytes: int = 64 << 10) -> dict[str, tuple[bytes, str]]:
    """The corpus items of at most ``max_bytes``: cheap bases for mutation tests."""
    return {k: v for k, v in corpus().items() if 0 < len(v[0]) <= max_bytes}


# -- damage, for property-based tests --------------------------------------------------------------------


def bit_flips(data: bytes, seed: int, n: int = 4) -> bytes:
    """``data`` with ``n`` random bits flipped (headers included)."""
    if not data:
        return data
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for pos in rng.integers(0, len(out), size=n):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def truncation(data: bytes, seed: int) -> bytes:
    """A random prefix of ``data``."""
    return data[: int(np.random.default_rng(seed).integers(0, len(data) + 1))]


def splice(a: bytes, b: bytes, seed: int) -> bytes:
    """A prefix of ``a`` followed by a suffix of ``b`` (a header of one format, the body of another)."""
    rng = np.random.default_rng(seed)
    return a[: int(rng.integers(0, len(a) + 1))] + b[int(rng.integers(0, len(b) + 1)) :]


def overwrite(data: bytes, seed: int, n: int = 16) -> bytes:
    """``data`` with a random run of up to ``n`` bytes replaced by random bytes (often a size field)."""
    if not data:
        return data
    rng = np.random.default_rng(seed)
    at = int(rng.integers(0, len(data)))
    return data[:at] + rng.bytes(int(rng.integers(1, n + 1))) + data[at + n :]


def mutations(data: bytes, seed: int, others: list[bytes] | None = None) -> Iterator[bytes]:
    """Damaged variants of ``data``: bit flips, a truncation, an overwritten run and, with ``others``, a
    splice with one of them. Deterministic in ``seed``."""
    yield bit_flips(data, seed)
    yield bit_flips(data, seed + 1, n=1)
    yield truncation(data, seed)
    yield overwrite(data, seed)
    if others:
        yield splice(data, others[seed % len(others)], seed)
