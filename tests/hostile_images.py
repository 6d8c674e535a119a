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


# -- files whose structure costs more than their pixels (issue 23, item 2 and 5; costs with Pillow 13) ----------


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker code, start, end) of each segment of a JPEG after SOI; a scan's end includes its entropy data.
    A plain walk for building test files (the code under test has its own)."""
    import re

    marker = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
    out, pos = [], 2
    while pos + 1 < len(data):
        code = data[pos + 1]
        if code == 0xD9:
            out.append((code, pos, pos + 2))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if code == 0xDA:
            end = marker.search(data, end).start()
        out.append((code, pos, end))
        pos = end
    return out


def progressive_jpeg(side: int = 4000) -> bytes:
    """A flat grey ``side x side`` progressive JPEG from libjpeg: 6 scans, the AC ones a few bytes each."""
    return encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)


def repeated_scan_jpeg(scans: int, side: int = 4000) -> bytes:
    """The issue's CPU bomb: a progressive JPEG whose smallest scan is repeated until the file has ``scans``
    scans. Each costs libjpeg a pass over every block (1,000 scans at 16 Mpx: ~1 s; 10,000: ~10 s)."""
    base = progressive_jpeg(side)
    segs = jpeg_segments(base)
    _, start, end = min((e - s, s, e) for code, s, e in segs if code == 0xDA)
    have = sum(code == 0xDA for code, _, _ in segs)
    return base[:end] + base[start:end] * (scans - have) + base[end:]


def empty_app_markers_jpeg(markers: int = 2_000_000) -> bytes:
    """A 64 x 64 JPEG with ``markers`` empty APP15 segments after SOI: 8 MB for 2 M (Pillow's header parser
    reads each in Python: 2.7 s, and libjpeg again: 3 s)."""
    small = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "JPEG")
    return small[:2] + b"\xff\xef\x00\x02" * markers + small[2:]


def empty_chunks_png(chunks: int = 2_500_000) -> bytes:
    """A 64 x 64 PNG with ``chunks`` empty private chunks before its image data: 30 MB for 2.5 M (Pillow
    reads each in Python: 5.5 s to open)."""
    png = encode(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG")
    at = png.index(b"IDAT") - 4
    return png[:at] + png_chunk(b"prVt", b"") * chunks + png[at:]


def one_byte_blocks_gif(blocks: int = 16_000_000) -> bytes:
    """A 64 x 64 GIF with a comment of ``blocks`` one-byte sub-blocks before its image: 32 MB for 16 M
    (Pillow reads each in Python when it opens the file: 6.9 s, and again to decode)."""
    gif = encode(Image.new("P", (64, 64), 1), "GIF")
    at = gif.index(b",", 13)  # the image descriptor, after the header and the global colour table
    return gif[:at] + b"!\xfe" + b"\x01c" * blocks + b"\x00" + gif[at:]


def rle_bmp(width: int, height: int, body: bytes) -> bytes:
    """An 8-bit RLE BMP (BI_RLE8) with a grey palette and ``body`` as its commands."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def one_pixel_runs_bmp(side: int = 4000) -> bytes:
    """``side x side`` RLE8 of one-pixel runs: 32 MB of commands Pillow decodes in Python (4.5 s)."""
    return rle_bmp(side, side, (b"\x01\x07" * side + b"\x00\x00") * side + b"\x00\x01")


def big_eps(n_bytes: int = 8 << 20) -> bytes:
    """An EPS Pillow would read a byte at a time in Python to find its header (8 MB: 2 s; the issue's
    63 MiB: 15 s): never parsed, it is not an accepted format."""
    line = b"x" * 200 + b"\n"
    return eps() + line * (n_bytes // len(line))


# -- real files with much structure, which must keep decoding --------------------------------------------------


def photo_pixels(w: int = 96, h: int = 64) -> Image.Image:
    """A smooth RGB image with some noise (JPEG-friendly, so DCT differences stay small)."""
    rng = np.random.default_rng(SEED + 4)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1).astype(np.int16)
    a += rng.integers(-8, 9, size=a.shape, dtype=np.int16)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def many_scans_jpeg(scans: int = 64) -> bytes:
    """A colour progressive JPEG from libjpeg (10 scans, Huffman tables written before the scans that use
    them, as mozjpeg does too) with its first-pass scans repeated, tables and all, to ``scans`` in all: a
    repeated first pass sets the same coefficients again, so it is the same image, with 6 times the scans
    (more than any encoder writes by default; under ``JPEG_MAX_SCANS``)."""
    base = encode(photo_pixels(), "JPEG", progressive=True, quality=90)
    segs = jpeg_segments(base)
    first = [s for code, s, e in segs if code == 0xDA and base[e - 2] >> 4 == 0]  # Ah = 0: a first pass
    extra = scans - sum(code == 0xDA for code, _, _ in segs)
    repeats = {s: extra // len(first) + (i < extra % len(first)) for i, s in enumerate(first)}
    out, tables = bytearray(base[:2]), b""
    for code, s, e in segs:
        if code == 0xC4:  # held until its scan, so a repeat carries its own table
            tables += base[s:e]
        elif code == 0xDA:
            out += (tables + base[s:e]) * (1 + repeats.get(s, 0))
            tables = b""
        else:
            out += tables + base[s:e]
            tables = b""
    return bytes(out)


def restart_every_mcu_jpeg() -> bytes:
    """A baseline JPEG with a restart marker after every MCU (RST markers are not segments)."""
    return encode(photo_pixels(), "JPEG", quality=90, restart_marker_blocks=1)


def exif_thumbnail_jpeg() -> bytes:
    """A JPEG whose EXIF block carries a JPEG thumbnail (its own SOI, scans and EOI inside APP1)."""
    thumb = encode(photo_pixels(32, 24), "JPEG", quality=80)
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 1) + struct.pack("<I", 26)  # next: IFD1
    ifd1 = struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, 56) + struct.pack("<HHII", 0x0202, 4, 1,
                                                                                        len(thumb))  # fmt: skip
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + struct.pack("<I", 0)
    assert len(tiff) == 56
    return encode(photo_pixels(), "JPEG", quality=90, exif=b"Exif\x00\x00" + tiff + thumb)


def split_icc_jpeg(profile_bytes: int = 1 << 20) -> bytes:
    """A JPEG with a 1 MiB ICC profile, split by Pillow over 17 APP2 segments. The profile's bytes are
    random, so they hold thousands of 0xFF pairs that look like markers: the walk must skip them by
    length. (Not a valid profile, which decoding does not read.)"""
    rng = np.random.default_rng(SEED + 5)
    return encode(photo_pixels(), "JPEG", quality=90, icc_profile=rng.bytes(profile_bytes))


def text_chunks_png(chunks: int = 200) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_text(f"k{i}", "value " * 10, zip=bool(i % 2))
    return encode(photo_pixels(), "PNG", pnginfo=info)


def small_idat_png() -> bytes:
    """A 1,024 x 1,024 PNG of noise in 8 KiB IDAT chunks, as libpng writes them (~400 chunks)."""
    img = Image.fromarray(np.random.default_rng(SEED + 6).integers(0, 255, (1024, 1024), dtype=np.uint8))
    png = encode(img, "PNG", compress_level=1)
    ihdr_end = png.index(b"IDAT") - 4
    iend = png.rindex(b"IEND") - 4
    pos, data = ihdr_end, b""
    while pos < iend:  # gather the image data, then split it again
        length = struct.unpack(">I", png[pos : pos + 4])[0]
        if png[pos + 4 : pos + 8] == b"IDAT":
            data += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return png[:ihdr_end] + b"".join(png_chunk(b"IDAT", data[i : i + 8192]) for i in range(0, len(data), 8192)) + (
        png[iend:])


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
        # structure that costs more than its pixels (refused from the bytes, before any decoder)
        ("progressive_4000x4000_1000_scans.jpg", repeated_scan_jpeg(1_000), "too_complex"),
        ("progressive_4000x4000_10000_scans.jpg", repeated_scan_jpeg(10_000), "too_complex"),
        ("jpeg_2M_empty_app_markers.jpg", empty_app_markers_jpeg(), "too_complex"),
        ("png_2.5M_empty_chunks.png", empty_chunks_png(), "too_complex"),
        ("gif_16M_one_byte_blocks.gif", one_byte_blocks_gif(), "too_complex"),
        ("bmp_rle8_4000x4000_one_pixel_runs.bmp", one_pixel_runs_bmp(), "too_complex"),
        ("postscript_8MB.eps", big_eps(), "not_an_image"),
        # real files with much structure
        ("progressive_libjpeg.jpg", encode(photo_pixels(), "JPEG", quality=90, progressive=True), "ok"),
        ("progressive_64_scans_table_per_scan.jpg", many_scans_jpeg(), "ok"),
        ("restart_every_mcu.jpg", restart_every_mcu_jpeg(), "ok"),
        ("exif_thumbnail.jpg", exif_thumbnail_jpeg(), "ok"),
        ("icc_1MiB_in_17_app2.jpg", split_icc_jpeg(), "ok"),
        ("text_chunks.png", text_chunks_png(), "ok"),
        ("idat_8KiB_chunks.png", small_idat_png(), "ok"),
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
