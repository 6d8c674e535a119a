"""Batch decoding on the model's device: a list of encoded images -> ``(B, 3, S, S)`` normalised tensor
there, with nvJPEG when the device is a GPU, by the checkpoint's own preprocessing rules.

    decoder = BatchDecoder.for_config(cfg, device="cuda", fallback=pool.preprocess)
    out = decoder(images)        # out.pixels (B, 3, S, S) on the device; out.errors[i]: None or ImageError
    out.ok                       # (B,) bool numpy: which rows hold an image

Which path an image takes (:func:`plan`), per image, never failing the batch:

- every image first passes the CPU path's checks on its header, before anything is decoded
  (``model.preprocess``: size in bytes, accepted formats, structure budget, pixel budget, short side);
  an image refused there gets the same :class:`~model.preprocess.ImageError` as on the CPU path;
- an 8-bit baseline or extended-sequential Huffman JPEG (SOF0/SOF1), greyscale (sampled 1x1) or YCbCr, whose
  last scan ends at an end-of-image marker, is decoded in one batched ``torchvision.io.decode_jpeg(list,
  device=...)`` call (nvJPEG on a GPU, libjpeg-turbo on a CPU); on a GPU only when it shrinks at least
  :data:`MIN_GPU_SHRINK` times to the model's input;
- everything else falls back to the CPU path one image at a time (``fallback``: the caller's bounded
  :class:`~model.decode_pool.DecodePool`, else :class:`~model.preprocess.Preprocessor`): PNG, WebP, GIF,
  BMP, progressive or arithmetic-coded JPEGs, CMYK/YCCK and RGB-coded (Adobe transform 0) JPEGs, grey JPEGs
  sampled other than 1x1, JPEGs decoded at about their own size, a JPEG without an end-of-image marker after
  its scan (truncated: the CPU path says so, libjpeg and nvJPEG would fill the rest with grey), and any image
  the batched call or a lone retry of it raises on.

On the device each image is then shrunk, turned and padded exactly as ``model.preprocess`` does on the
CPU: the aspect rule's window (:func:`~model.preprocess.aspect_box`, after EXIF orientation), the
integer shrink PIL applies (its JPEG DCT scaling of 1/2, 1/4 or 1/8 is a box filter of that factor here,
then the box filter of the remaining factor), EXIF orientation, a bicubic resize of the long side to S
with PIL's antialiasing (``torch.nn.functional.interpolate(..., antialias=True)``), centred on a white
square, rounded to 8 bits as PIL's image is, and normalised with the checkpoint's mean and std.
Images of the same shape and plan are processed together (one set of kernels per shape, not per image).

The two paths agree within :data:`MEAN_ABS_TOLERANCE` and :data:`OUTLIER_SHARE` (measured on the CPU with
libjpeg on both sides; nvJPEG's chroma upsampling may add to it: ``danmul bench gpu`` reports the agreement
measured on the GPU). Device memory is bounded: the batched call gets at most
:data:`DEVICE_BATCH_PIXELS` declared pixels at a time.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from model.preprocess import (
    _ORIENT,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    ImageError,
    Preprocessor,
    _check_bytes,
    _guarded,
    _open_checked,
    _shrink_factor,
)

# Agreement with the CPU path, per image, in normalised units (mean/std 0.5: 0.1 = 13 levels of 8 bits). Measured
# with libjpeg-turbo on both sides (torchvision's decode_jpeg on the CPU) over 150 JPEGs of 160 to 2400 px, aspect
# ratios to 3:1, quality 75-95, all three chroma subsamplings, some greyscale: the worst image's mean |difference|
# 0.025 at S = 64 (1/8 DCT scaling), 0.009 at 224, 0.006 at 448 (averages 0.005, 0.003, 0.001); the worst image's
# share of values off by more than 0.1: 5.5% at 64, 1.7% at 224, 0.9% at 448. Single values differ by up to
# 1.1 at hard edges: PIL decodes a JPEG shrunk by a scaled IDCT (and 4:2:0 chroma at half of that), here it is a
# box filter of the full decode. The top-1 character of a model agreed on every image. Bounds: 2x the worst.
MEAN_ABS_TOLERANCE = 0.05
OUTLIER_DIFF = 0.1  # a value off by more than this is an outlier ...
OUTLIER_SHARE = 0.1  # ... and at most this share of an image's values may be
# declared pixels one batched decode call may hold (uint8 RGB: 3 bytes each, ~200 MB): 256 images of 512 x 512
# in one call, while a batch of large images (each allowed up to 50 Mpx by the pixel budget) is split
DEVICE_BATCH_PIXELS = 1 << 26
# The smallest shrink (the aspect window's long side over S) at which an image goes to nvJPEG. Measured on an
# H200 (danmul bench gpu, 2026-12-04): 512 px JPEGs at S = 224 (shrink 2.3) agree with the CPU path within 0.014
# (worst image's mean |difference|), but images decoded at about their own size differed by 0.075 and 0.081
# (64 x 48 at S = 64): nvJPEG upsamples chroma without libjpeg's smoothing, a difference a shrink averages away.
MIN_GPU_SHRINK = 2

GPU, CPU = "gpu", "cpu"  # decode paths: the batch decoder on the model's device, or PIL per image
SETTINGS = ("auto", "on", "off")
_JPEG_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential DCT, Huffman: what nvJPEG decodes
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_SOS, _JPEG_EOI = 0xDA, b"\xff\xd9"


# -- which path: per device, per image -------------------------------------------------------------------------
@functools.cache
def device_decode_available(device: str) -> bool:
    """Whether torchvision can decode JPEGs on ``device`` here (its image extension built, nvJPEG with it for a
    GPU): one tiny JPEG decoded there, once per device per process."""
    try:
        import io

        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("L", (8, 8), 128).save(buf, format="JPEG")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its image decoders for TorchCodec
            [out] = decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)],
                                mode=ImageReadMode.RGB, device=device)
        return tuple(out.shape) == (3, 8, 8)
    except Exception:  # no torchvision, no image extension, no nvJPEG, no such device
        return False


def decode_path(device: str | torch.device, setting: str = "auto", probe: bool = True) -> str:
    """Where a predictor on ``device`` decodes: :data:`GPU` (the batch decoder, on the device) or :data:`CPU`
    (PIL, per image). ``auto``: the batch decoder on a CUDA device whose decoder works, else PIL; ``on``: the
    batch decoder wherever torchvision can decode (libjpeg-turbo on a CPU: the same code without a GPU, for
    tests and measurement); ``off``: PIL. ``probe=False`` assumes the decoder works (a Ray driver deciding for
    GPUs on other nodes; :class:`BatchDecoder` still sends everything to the CPU path where it does not)."""
    if setting not in SETTINGS:
        raise ValueError(f"--gpu-decode must be one of {', '.join(SETTINGS)}, not {setting!r}")
    device = torch.device(device)
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return CPU
    return GPU if not probe or device_decode_available(str(device)) else CPU


@dataclass(frozen=True)
class Plan:
    """How one JPEG becomes a model input on the device, read from its header: all in stored pixels (as
    decoded) except ``target``, the displayed size after orientation and before padding."""

    width: int
    height: int
    crop: tuple[int, int, int, int]  # the region to decode-shrink: the aspect window, aligned to ``draft``
    draft: int  # the JPEG DCT scaling PIL would apply (1, 2, 4 or 8): a box filter of this factor here
    factor: int  # the box filter after it
    orientation: int  # EXIF, 1..8
    resized: tuple[int, int]  # (w, h) after the shrinking and turning, before the bicubic resize
    target: tuple[int, int]  # (w, h) of the resized image: the long side is S


def _jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """The SOF marker code and the offset of the first scan's data, walking the header's segments (already
    bounded by the structure budget); None where the header has stray bytes or ends first."""
    pos, n, frame = 2, len(data), None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        code = data[pos + 1]
        if code == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if code in _JPEG_SOF:
            frame = code
        if code == _JPEG_SOS:
            return (frame, pos) if frame is not None else None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def plan(data: bytes, size: int, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Plan | None:
    """Run the CPU path's checks on the header (raising the same :class:`ImageError`), then say how the batch
    decoder would take this image, or None when it goes to the CPU path (see the module's doc)."""
    return _guarded(lambda: _plan(data, size, max_pixels, max_bytes))


def _plan(data: bytes, size: int, max_pixels: int, max_bytes: int) -> Plan | None:
    _check_bytes(data, max_bytes)
    img, orientation, box, _ = _open_checked(data, max_pixels)  # every check decode makes before decoding
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.info.get("progressive"):
        return None
    if img.mode == "RGB" and (img.info.get("adobe_transform") == 0 or [c[0] for c in img.layer] == [82, 71, 66]):
        return None  # RGB-coded, not YCbCr: libjpeg reads it by its markers, nvJPEG would not
    if img.mode == "L" and any(c[1] != 1 or c[2] != 1 for c in img.layer):
        # one component sampled 2x1 or 2x2 (legal, meaningless): nvJPEG decoded such files wrong on an H200
        # (mean |difference| 0.20 and 0.35 against libjpeg), while 1x1 grey files agreed within 0.002
        return None
    frame = _jpeg_frame(data)
    if frame is None or frame[0] not in _JPEG_SEQUENTIAL or data.rfind(_JPEG_EOI) < frame[1]:
        return None  # arithmetic, lossless or hierarchical; or no end-of-image marker after the scan
    w, h = img.size
    # what model.preprocess._decode does: PIL's draft picks the DCT scaling, the box is scaled with it
    scale, draft = min(8, _shrink_factor(box, size)), 1
    if scale >= 2:
        fit = min(w // max(1, w // scale), h // max(1, h // scale))
        draft = next(s for s in (8, 4, 2, 1) if fit >= s)
    dw, dh = -(-w // draft), -(-h // draft)  # the drafted image's size
    x0, y0 = box[0] // draft, box[1] // draft
    x1, y1 = min(-(-box[2] // draft), dw), min(-(-box[3] // draft), dh)
    factor = _shrink_factor((x0, y0, x1, y1), size)
    rw, rh = -(-(x1 - x0) // factor), -(-(y1 - y0) // factor)
    if orientation >= 5:
        rw, rh = rh, rw
    long = max(rw, rh)
    target = (max(1, round(rw * size / long)), max(1, round(rh * size / long)))
    crop = (x0 * draft, y0 * draft, min(x1 * draft, w), min(y1 * draft, h))
    return Plan(w, h, crop, draft, factor, orientation, (rw, rh), target)



PLAN_FIELDS = 13  # a Plan as one int32 row (a fixed-shape column between a Ray Data decode task and a predictor)


def plan_row(p: Plan | None) -> np.ndarray:
    """A plan as ``PLAN_FIELDS`` int32s; all zeros for None (the image takes the CPU path)."""
    if p is None:
        return np.zeros(PLAN_FIELDS, dtype=np.int32)
    return np.array([p.width, p.height, *p.crop, p.draft, p.factor, p.orientation, *p.resized, *p.target],
                    dtype=np.int32)


def plan_of_row(row: Sequence[int]) -> Plan | None:
    v = [int(x) for x in row]
    if not any(v):
        return None
    return Plan(v[0], v[1], (v[2], v[3], v[4], v[5]), v[6], v[7], v[8], (v[9], v[10]), (v[11], v[12]))


def to_uint8(array: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A CPU-path model input ``(3, S, S)`` float32 -> the 8-bit RGB square it was made from, ``(S, S, 3)``
    uint8: exact (the CPU path normalises an 8-bit image), and a quarter of the bytes to move."""
    rgb = (array.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# -- the batch decoder -----------------------------------------------------------------------------------------
@dataclass
class DecodedBatch:
    pixels: torch.Tensor  # (B, 3, S, S) float32 on the device, normalised; rows that failed are zeros
    errors: list[ImageError | None]  # per image: why it is not a model input, or None
    paths: list[str] = field(default_factory=list)  # per image: GPU, CPU or "" (refused from its header)

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


class BatchDecoder:
    """Images -> a :class:`DecodedBatch` on ``device`` (see the module's doc). An image is encoded bytes, or
    an 8-bit ``(S, S, 3)`` square the CPU path already made (:func:`to_uint8`). ``fallback(bytes)`` is the
    CPU path for one image: a ``(3, S, S)`` float32 array, or :class:`ImageError`; by default
    :class:`~model.preprocess.Preprocessor` in this process (a caller that must bound each decode passes
    :meth:`model.decode_pool.DecodePool.preprocess`)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 device: str | torch.device = "cpu", fallback: Callable[[bytes], np.ndarray] | None = None,
                 max_pixels: int = MAX_PIXELS, batch_pixels: int = DEVICE_BATCH_PIXELS):
        self.image_size, self.device = image_size, torch.device(device)
        self.max_pixels, self.batch_pixels = max_pixels, batch_pixels
        self.mean_std = tuple(mean), tuple(std)
        self.fallback = fallback or Preprocessor(image_size, mean, std).array
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def for_config(cls, cfg, device: str | torch.device = "cpu", **kwargs) -> BatchDecoder:
        return cls(cfg.image_size, cfg.mean, cfg.std, device, **kwargs)

    def plans(self, images: Sequence[bytes]) -> tuple[list[Plan | None], list[ImageError | None]]:
        """Each image's header checked and planned (:func:`plan`): the part of decoding a CPU does."""
        plans: list[Plan | None] = []
        errors: list[ImageError | None] = []
        for data in images:
            try:
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise ImageError("not_an_image", f"{type(data).__name__}, not bytes")
                plans.append(plan(bytes(data), self.image_size, self.max_pixels))
                errors.append(None)
            except ImageError as e:
                plans.append(None)
                errors.append(e)
        return plans, errors

    def __call__(self, images: Sequence[bytes | np.ndarray], plans: Sequence[Plan | None] | None = None
                 ) -> DecodedBatch:
        """``plans``: what :meth:`plans` said of each image (made elsewhere, e.g. in a CPU task); without
        them the headers are checked and planned here first."""
        n, s = len(images), self.image_size
        errors: list[ImageError | None] = [None] * n
        if plans is None:
            encoded = [i for i, im in enumerate(images) if not isinstance(im, np.ndarray)]
            found, why = self.plans([images[i] for i in encoded])
            plans = [None] * n
            for i, p, e in zip(encoded, found, why, strict=True):
                plans[i], errors[i] = p, e
        device = any(p is not None for p in plans) and device_decode_available(str(self.device))
        if self.device.type == "cuda":  # nvJPEG: images it would decode at about their own size go to the CPU path
            plans = [p if p is None or p.draft * p.factor >= MIN_GPU_SHRINK else None for p in plans]
        paths = ["" if errors[i] else GPU if plans[i] is not None and device else CPU for i in range(n)]
        canvas = torch.full((n, 3, s, s), 255.0, dtype=torch.float32, device=self.device)  # 0..255, white
        ready = [i for i in range(n) if isinstance(images[i], np.ndarray)]
        fallback = [i for i in range(n) if paths[i] == CPU and i not in set(ready)]
        squares = {i: images[i] for i in ready}
        for chunk in self._chunks({i: plans[i] for i in range(n) if paths[i] == GPU}):
            fallback += self._decode_into(canvas, {i: images[i] for i in chunk}, {i: plans[i] for i in chunk})
        for i in sorted(fallback):  # the CPU path, one image at a time
            paths[i] = CPU
            try:
                squares[i] = to_uint8(np.asarray(self.fallback(bytes(images[i]))), *self.mean_std)
            except ImageError as e:
                errors[i] = e
        if squares:
            rows = sorted(squares)
            host = torch.from_numpy(np.stack([squares[i] for i in rows]))  # (R, S, S, 3) uint8
            if self.device.type == "cuda":
                host = host.pin_memory()
            moved = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            for j, i in enumerate(rows):  # row by row: an index tensor would be copied to the GPU and wait for it
                canvas[i] = moved[j]
        pixels = canvas.round_().div_(255.0).sub_(self._mean).div_(self._std)  # (B, 3, S, S), as to_array
        for i in range(n):
            if errors[i] is not None:
                pixels[i] = 0.0
        return DecodedBatch(pixels, errors, paths)

    def _chunks(self, plans: dict[int, Plan]) -> list[list[int]]:
        """The images for the batched decoder, in calls of at most ``batch_pixels`` declared pixels."""
        chunks, chunk, total = [], [], 0
        for i, p in plans.items():
            if chunk and total + p.width * p.height > self.batch_pixels:
                chunks.append(chunk)
                chunk, total = [], 0
            chunk.append(i)
            total += p.width * p.height
        return [*chunks, chunk] if chunk else chunks

    def _decode_into(self, canvas: torch.Tensor, data: dict[int, bytes], plans: dict[int, Plan]) -> list[int]:
        """Decode ``data`` on the device and draw each into its row of ``canvas`` (0..255); returns the images
        the decoder refused or decoded to another size than their header's (for the CPU path)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        order = list(data)
        encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in order]
        decoded: dict[int, torch.Tensor] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29's deprecation of its decoders; libjpeg's warnings
            try:
                decoded = dict(zip(order, decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device),
                                   strict=True))
            except Exception:  # one bad image fails the whole call: find it, decoding one at a time
                for i, one in zip(order, encoded, strict=True):
                    with contextlib.suppress(Exception):
                        decoded[i] = decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device)
        for i in list(decoded):
            if tuple(decoded[i].shape) != (3, plans[i].height, plans[i].width):
                del decoded[i]
        groups: dict[Plan, list[int]] = {}
        for i in decoded:
            groups.setdefault(plans[i], []).append(i)
        for p, rows in groups.items():
            self._draw(canvas, p, rows, [decoded[i] for i in rows])
        return [i for i in order if i not in decoded]

    def _draw(self, canvas: torch.Tensor, p: Plan, rows: list[int], images: list[torch.Tensor]) -> None:
        """Images of one plan (uint8 ``(3, H, W)`` each) -> shrunk, turned and resized into their rows of
        ``canvas``, centred: what ``model.preprocess`` does to them on the CPU."""
        x0, y0, x1, y1 = p.crop
        crops = [im[None, :, y0:y1, x0:x1] for im in images]
        x = (crops[0] if len(crops) == 1 else torch.cat(crops)).float()  # (G, 3, h, w)
        for k in (p.draft, p.factor):  # PIL's DCT scaling, then its reduce(): box filters, the last block partial
            if k > 1:
                x = F.avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False)
        x = _turn(x, p.orientation)  # (G, 3, rh, rw)
        s, (tw, th) = self.image_size, p.target
        if max(p.resized) // s >= 2:  # model.preprocess.to_array reduces first when still 2x too big
            k = max(p.resized) // s
            x = F.avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False)
        if (x.shape[-1], x.shape[-2]) != (tw, th):
            x = F.interpolate(x, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
        left, top = (s - tw) // 2, (s - th) // 2
        x = x.clamp_(0.0, 255.0)
        for j, i in enumerate(rows):  # row by row: an index tensor would be copied to the GPU and wait for it
            canvas[i, :, top : top + th, left : left + tw] = x[j]


def _turn(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation on ``(..., H, W)``: ``PIL.Image.transpose`` with ``model.preprocess._ORIENT``'s ops."""
    if orientation not in _ORIENT:
        return x
    return {
        2: lambda: x.flip(-1),  # FLIP_LEFT_RIGHT
        3: lambda: x.flip(-1).flip(-2),  # ROTATE_180
        4: lambda: x.flip(-2),  # FLIP_TOP_BOTTOM
        5: lambda: x.transpose(-1, -2),  # TRANSPOSE
        6: lambda: torch.rot90(x, -1, (-2, -1)),  # ROTATE_270
        7: lambda: x.transpose(-1, -2).flip(-1).flip(-2),  # TRANSVERSE
        8: lambda: torch.rot90(x, 1, (-2, -1)),  # ROTATE_90
    }[orientation]()


def disagreement(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of two ``(B, 3, S, S)`` batches: the mean |difference| and the share of values off by more
    than :data:`OUTLIER_DIFF` (what :data:`MEAN_ABS_TOLERANCE` and :data:`OUTLIER_SHARE` bound)."""
    d = (a.float() - b.float().to(a.device)).abs().flatten(1)
    return d.mean(1), (d > OUTLIER_DIFF).float().mean(1)
