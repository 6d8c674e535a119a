"""The batch decoder (model/gpu_decode.py): which path each device and each image takes, the per-image
fallback that never fails a batch, the same refusals as the CPU path, and agreement with the CPU path within
the stated tolerance. Runs on the CPU (torchvision's libjpeg stands in for nvJPEG: the same code); the tests
marked ``cuda`` repeat the agreement on a GPU where there is one."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hostile_images import corpus, exif_rotated_jpeg, mutations, small_corpus
from PIL import Image

import model.gpu_decode as G
from model.config import preset
from model.curriculum import no_text
from model.gpu_decode import (
    CPU,
    GPU,
    MEAN_ABS_TOLERANCE,
    MIN_GPU_SHRINK,
    OUTLIER_SHARE,
    BatchDecoder,
    decode_path,
    disagreement,
    plan,
    plan_of_row,
    plan_row,
    to_uint8,
)
from model.network import DanmulNet
from model.preprocess import ImageError, Preprocessor
from ray_jobs.samples import illustration, sample_jpegs

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CUDA = torch.cuda.is_available() and G.device_decode_available("cuda")


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def cpu_path(images: list[bytes], size: int) -> torch.Tensor:
    pre = Preprocessor(size, MEAN, STD)
    return torch.stack([torch.from_numpy(pre.array(b)) for b in images])


def varied_jpegs() -> list[bytes]:
    """JPEGs of 160 to 2400 px (DCT scaling 1/2 to 1/8 on the CPU path), aspect ratios to 3:1, some grey (two of
    them, 5 and 10, sampled 2x2 and 2x1: legal, and left to the CPU path)."""
    rng = np.random.default_rng(5)
    out = []
    for i, long in enumerate([512] * 10 + [160, 300, 768, 1200, 2400, 700]):
        aspect = float(np.exp(rng.uniform(-np.log(3), np.log(3))))
        w, h = (long, max(8, round(long / aspect))) if aspect >= 1 else (max(8, round(long * aspect)), long)
        img = illustration(rng, w, h)
        out.append(encode(img.convert("L") if i % 5 == 0 else img, quality=int(rng.integers(75, 96)),
                          subsampling=i % 3))
    return out


# -- which path ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,setting,available,expected", [
    ("cpu", "auto", True, CPU),  # auto: only a GPU decodes in batches
    ("cuda", "auto", True, GPU),
    ("cuda:1", "auto", True, GPU),
    ("cuda", "auto", False, CPU),  # no nvJPEG (torchvision without its CUDA image ops): PIL
    ("cuda", "off", True, CPU),
    ("cpu", "on", True, GPU),  # on: the batch decoder wherever torchvision decodes (libjpeg on a CPU)
    ("cuda", "on", False, CPU),
    ("cpu", "off", True, CPU),
])  # fmt: skip
def test_the_path_follows_the_device_and_the_setting(monkeypatch, device, setting, available, expected):
    monkeypatch.setattr(G, "device_decode_available", lambda d: available)
    assert decode_path(device, setting) == expected


def test_a_bad_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="--gpu-decode must be one of auto, on, off"):
        decode_path("cpu", "yes")


def test_torchvision_decodes_on_this_cpu():
    assert G.device_decode_available("cpu")
    assert not G.device_decode_available("no-such-device")


def test_which_images_the_batch_decoder_takes():
    rng = np.random.default_rng(0)
    img = illustration(rng, 96, 64)
    takes = {"baseline": encode(img), "grey": encode(img.convert("L")), "4:2:0": encode(img, subsampling=2),
             "exif rotated": exif_rotated_jpeg(), "garbage after the end": encode(img) + b"\0" * 100}
    leaves = {"progressive": encode(img, progressive=True), "cmyk": encode(img.convert("CMYK")),
              "png": encode(img, "PNG"), "webp": encode(img, "WEBP"), "gif": encode(img, "GIF"),
              "bmp": encode(img, "BMP"), "truncated": encode(img)[:-400]}  # fmt: skip
    assert {k: plan(v, 32) is not None for k, v in takes.items()} == dict.fromkeys(takes, True)
    assert {k: plan(v, 32) for k, v in leaves.items()} == dict.fromkeys(leaves)


def test_a_plan_travels_as_a_row():
    p = plan(exif_rotated_jpeg(), 64)
    assert p is not None and p.orientation == 6
    assert plan_of_row(plan_row(p)) == p and plan_of_row(plan_row(None)) is None


def test_the_cpu_paths_8_bit_square_is_exact():
    arr = Preprocessor(48, (0.48, 0.45, 0.4), (0.27, 0.26, 0.28)).array(encode(illustration(np.random.default_rng(1),
                                                                                           90, 50), "PNG"))
    back = to_uint8(arr, (0.48, 0.45, 0.4), (0.27, 0.26, 0.28))
    again = (back.astype(np.float32) / 255 - np.float32([0.48, 0.45, 0.4])) / np.float32([0.27, 0.26, 0.28])
    np.testing.assert_allclose(again.transpose(2, 0, 1), arr, atol=1e-6)


# -- agreement with the CPU path -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 224])
def test_batch_decoding_agrees_with_the_cpu_path_within_the_tolerance(size):
    images = varied_jpegs()
    out = BatchDecoder(size, MEAN, STD, "cpu")(images)
    assert out.paths == [CPU if i in (5, 10) else GPU for i in range(len(images))] and out.ok.all()
    mean, outliers = disagreement(out.pixels, cpu_path(images, size))
    assert float(mean.max()) <= MEAN_ABS_TOLERANCE and float(outliers.max()) <= OUTLIER_SHARE
    assert float(mean.mean()) < MEAN_ABS_TOLERANCE / 4  # the bound is for the worst image, not the usual one


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_and_the_aspect_rule_as_on_the_cpu(orientation):
    """A tall strip (cropped to its top by the aspect rule) stored turned: the window is taken upright."""
    rng = np.random.default_rng(orientation)
    img = illustration(rng, 90, 400)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, quality=95, exif=exif.tobytes())
    out = BatchDecoder(64, MEAN, STD, "cpu")([data])
    assert out.paths == [GPU]
    mean, outliers = disagreement(out.pixels, cpu_path([data], 64))
    assert float(mean[0]) <= MEAN_ABS_TOLERANCE / 2 and float(outliers[0]) <= OUTLIER_SHARE


def test_the_models_top1_agrees_on_both_paths():
    images = sample_jpegs(40, seed=3)
    torch.manual_seed(0)
    net = DanmulNet(preset("tiny", num_characters=24, num_tags=30, image_size=64)).eval()
    text = no_text(len(images), 34)
    with torch.no_grad():
        cpu = net(cpu_path(images, 64), text)["characters"].softmax(-1)
        batch = net(BatchDecoder(64, MEAN, STD, "cpu")(images).pixels, text)["characters"].softmax(-1)
    assert torch.equal(cpu.argmax(-1), batch.argmax(-1))
    assert float((cpu - batch).abs().max()) < 0.01


# -- per-image fallback: a batch never fails ----------------------------------------------------------------------
def test_every_image_the_batch_decoder_leaves_gets_the_cpu_path_and_nothing_fails():
    rng = np.random.default_rng(2)
    img = illustration(rng, 120, 80)
    images = [encode(img), encode(img, "PNG"), encode(img, progressive=True), encode(img)[:-300], b"not an image",
              encode(img.convert("CMYK")), encode(img, "WEBP")]
    out = BatchDecoder(64, MEAN, STD, "cpu")(images)
    assert out.paths == [GPU, CPU, CPU, CPU, "", CPU, CPU]
    assert [e.reason if e else None for e in out.errors] == [None, None, None, "truncated", "not_an_image", None, None]
    ok = out.ok
    np.testing.assert_allclose(out.pixels[1:3].numpy(), cpu_path(images[1:3], 64).numpy(), atol=1e-5)
    np.testing.assert_allclose(out.pixels[5:].numpy(), cpu_path(images[5:], 64).numpy(), atol=1e-5)
    assert not out.pixels[~torch.from_numpy(ok)].any()  # failed rows are zeros


def test_an_image_the_device_decoder_raises_on_goes_to_the_cpu_path_alone(monkeypatch):
    """nvJPEG fails a whole batched call for one bad image: it is found by decoding one at a time, and only it
    takes the CPU path (the CPU path decides what it is)."""
    import torchvision.io

    images = sample_jpegs(5, long_side=96, seed=4)
    real, calls = torchvision.io.decode_jpeg, []

    def decode_jpeg(data, mode, device):
        calls.append(len(data) if isinstance(data, list) else 1)
        items = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == images[2] for t in items):
            raise RuntimeError("nvjpeg: NVJPEG_STATUS_BAD_JPEG")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    seen = []
    out = BatchDecoder(64, MEAN, STD, "cpu", fallback=lambda b: seen.append(b) or Preprocessor(64, MEAN, STD).array(b))(
        images)
    assert calls == [5, 1, 1, 1, 1, 1] and seen == [images[2]]
    assert out.paths == [GPU, GPU, CPU, GPU, GPU] and out.ok.all()


def test_a_fallback_that_refuses_gives_its_reason():
    def budget(data: bytes):
        raise ImageError("too_costly", "over the CPU budget")

    img = illustration(np.random.default_rng(0), 50, 40)
    out = BatchDecoder(32, MEAN, STD, "cpu", fallback=budget)([encode(img, "PNG"), encode(img)])
    assert [e.reason if e else None for e in out.errors] == ["too_costly", None]


def test_already_decoded_squares_and_given_plans_are_used_as_they_are():
    images = sample_jpegs(3, long_side=120, seed=6)
    pre = Preprocessor(48, MEAN, STD)
    square = to_uint8(pre.array(images[0]), MEAN, STD)
    decoder = BatchDecoder(48, MEAN, STD, "cpu")
    plans, errors = decoder.plans(images[1:])
    assert errors == [None, None]
    out = decoder([square, *images[1:]], [None, *plans])
    assert out.paths == [CPU, GPU, GPU]
    np.testing.assert_allclose(out.pixels[0].numpy(), pre.array(images[0]), atol=1e-6)


def test_device_memory_is_bounded_by_splitting_the_batched_call(monkeypatch):
    import torchvision.io

    images = sample_jpegs(6, long_side=200, seed=7)
    real, calls = torchvision.io.decode_jpeg, []  # the pixels each call decoded

    def decode_jpeg(data, mode, device):
        out = real(data, mode=mode, device=device)
        calls.append(sum(t.shape[1] * t.shape[2] for t in out))
        return out

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    whole = BatchDecoder(64, MEAN, STD, "cpu")(images).pixels
    split = BatchDecoder(64, MEAN, STD, "cpu", batch_pixels=200 * 200)(images).pixels
    assert len(calls) > 2 and max(calls[1:]) <= 200 * 200 and sum(calls[1:]) == calls[0]
    assert torch.equal(whole, split)


# -- hostile images: the same answers as the CPU path ---------------------------------------------------------------
def cpu_reason(data: bytes) -> str:
    try:
        Preprocessor(64, MEAN, STD).array(data)
        return "ok"
    except ImageError as e:
        return e.reason


ON_DEVICE = frozenset({"photo.jpg", "exif_rotated.jpg", "restart_every_mcu.jpg", "strip_600x40000.jpg"})


def check_corpus(device: str, on_device: frozenset = ON_DEVICE) -> None:
    """The corpus's answers, and the pixels of those the batch decoder took as the CPU path's (strips, EXIF
    rotation and thumbnails, restart markers, a 1 MiB ICC profile in 17 segments, bytes after the end)."""
    items = corpus()
    out = BatchDecoder(64, MEAN, STD, device)([data for data, _ in items.values()])
    got = {name: e.reason if e else "ok" for name, e in zip(items, out.errors, strict=True)}
    assert got == {name: expected for name, (_, expected) in items.items()}
    taken = [i for i, p in enumerate(out.paths) if p == GPU and out.errors[i] is None]
    names = [list(items)[i] for i in taken]
    assert set(names) >= on_device
    mean, outliers = disagreement(out.pixels[taken].cpu(), cpu_path([items[n][0] for n in names], 64))
    assert float(mean.max()) <= MEAN_ABS_TOLERANCE and float(outliers.max()) <= OUTLIER_SHARE


def test_the_hostile_corpus_gets_the_cpu_paths_answers():
    check_corpus("cpu")


def test_damaged_jpegs_get_the_cpu_paths_answers():
    bases = [data for name, (data, _) in small_corpus().items() if name.endswith(".jpg")]
    bases += sample_jpegs(3, long_side=96, seed=8)
    damaged = [m for seed, data in enumerate(bases) for k in range(8) for m in mutations(data, 100 * seed + k, bases)]
    out = BatchDecoder(64, MEAN, STD, "cpu")(damaged)
    assert [e.reason if e else "ok" for e in out.errors] == [cpu_reason(d) for d in damaged]
    assert out.paths.count(GPU) > len(damaged) // 10  # many damaged files still go to the batch decoder


# -- on a GPU (the device check runs these) --------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with torchvision's nvJPEG decoder")
def test_nvjpeg_agrees_with_the_cpu_path_within_the_tolerance():
    images = varied_jpegs()
    out = BatchDecoder(224, MEAN, STD, "cuda")(images)
    shrunk = [(p := plan(im, 224)) is not None and p.draft * p.factor >= MIN_GPU_SHRINK for im in images]
    assert out.pixels.device.type == "cuda" and out.paths == [GPU if s else CPU for s in shrunk]
    assert out.paths.count(GPU) >= 8  # most go to nvJPEG: the test compares something
    mean, outliers = disagreement(out.pixels.cpu(), cpu_path(images, 224))
    print(f"nvJPEG vs CPU path: worst image mean |diff| {float(mean.max()):.4f}, outliers {float(outliers.max()):.4f}; "
          f"per image: {[round(float(m), 4) for m in mean]}; paths {out.paths}")
    assert float(mean.max()) <= MEAN_ABS_TOLERANCE and float(outliers.max()) <= OUTLIER_SHARE


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with torchvision's nvJPEG decoder")
def test_nvjpeg_gives_the_cpu_paths_answers_to_hostile_images():
    check_corpus("cuda", frozenset({"strip_600x40000.jpg"}))  # the others are not shrunk 2x: the CPU path
    bases = [data for name, (data, _) in small_corpus().items() if name.endswith(".jpg")]
    damaged = [m for seed, data in enumerate(bases) for k in range(8) for m in mutations(data, 100 * seed + k, bases)]
    out = BatchDecoder(64, MEAN, STD, "cuda")(damaged)
    assert [e.reason if e else "ok" for e in out.errors] == [cpu_reason(d) for d in damaged]
