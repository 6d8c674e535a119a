"""The decode budgets, measured: what the hostile files of issue 23 cost before and after, and what the
decode pool costs ordinary images.

    git show a56def1:model/preprocess.py > /tmp/preprocess_before.py     # the code before the budgets
    python -m ray_jobs.bench_decode --before /tmp/preprocess_before.py

A source checkout only: the files are the hostile corpus's own (``tests/hostile_images.py``).

  A. each hostile file: the HTTP API's check and a replica's decode, before (``--before``: Pillow's header
     parse without a format list, as the old ``image_pixels``; the old module's ``Preprocessor``, in this
     process: CPU seconds) and after (``DecodePool.check`` and ``DecodePool.preprocess``: seconds until the
     answer, and the answer);
  B. the structure scan alone on 32 MiB files built to be slow to scan (seconds);
  C. ordinary throughput: ``--images`` 512 px JPEGs preprocessed to ``--image-size`` by ``Preprocessor`` in
     this process, by a pool of one worker (the same work plus the pipes: the pool's overhead), and by a
     pool of two workers fed concurrently (images/s, best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import os
import sys
import time

import numpy as np


def _hostile():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(here, "tests"))  # the corpus the tests run through the real pipeline
    import hostile_images

    return hostile_images


def _load(path: str):
    spec = importlib.util.spec_from_file_location("preprocess_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn, clock) -> tuple[float, str]:
    """``fn()``'s time on ``clock`` and its outcome: ok, or the reason (or class) of what it raised."""
    t0 = clock()
    try:
        fn()
        outcome = "ok"
    except Exception as e:
        outcome = getattr(e, "reason", type(e).__name__)
    return clock() - t0, outcome


def _cpu(fn) -> tuple[float, str]:
    return _timed(fn, time.process_time)


def _wall(fn) -> tuple[float, str]:
    return _timed(fn, time.perf_counter)


def _old_api_check(data: bytes) -> tuple[int, int]:
    """The HTTP API's pixel check as it was before the change (deploy/http.py ``image_pixels``), reproduced to
    measure what the hostile files cost it: every format Pillow knows (``formats=None``, EPS included), on
    purpose, in this benchmark only."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=None) as img:
        return img.size


def hostile_files(h) -> dict[str, bytes]:
    return {
        "progressive 4000x4000, 1,000 scans": h.repeated_scan_jpeg(1_000),
        "progressive 4000x4000, 10,000 scans": h.repeated_scan_jpeg(10_000),
        "progressive 4000x4000, 40,000 scans": h.repeated_scan_jpeg(40_000),
        "JPEG, 2 M empty APP markers": h.empty_app_markers_jpeg(),
        "PNG, 2.5 M empty chunks": h.empty_chunks_png(),
        "GIF, 16 M one-byte blocks": h.one_byte_blocks_gif(),
        "RLE8 BMP, 16 M one-pixel runs": h.one_pixel_runs_bmp(),
        "EPS, 31 MiB": h.big_eps(31 << 20),
        "EPS, 63 MiB": h.big_eps(63 << 20),
    }


def slow_scans(h) -> dict[str, bytes]:
    jpeg = h.encode(h.photo_pixels(), "JPEG")
    header = jpeg.index(b"\xff\xda") + 2 + int.from_bytes(jpeg[jpeg.index(b"\xff\xda") + 2:][:2], "big")
    gif = h.one_byte_blocks_gif(0)
    at = gif.index(b",", 13)
    return {
        "JPEG, 32 MiB of stuffed 0xFF00 in one scan": jpeg[:header] + b"\xff\x00" * (16 << 20) + b"\xff\xd9",
        "JPEG, 32 MiB of 0xFF fill in one scan": jpeg[:header] + b"\xff" * (32 << 20) + b"\xff\xd9",
        "GIF, 30 MiB of 1- and 2-byte blocks": gif[:at] + b"!\xfe" + b"\x01c\x02cc" * (6 << 20) + b"\x00" + gif[at:],
        "PNG, 2.5 M empty chunks": h.empty_chunks_png(),
    }


def throughput(images: list[bytes], image_size: int, repeats: int) -> dict[str, float]:
    from model.decode_pool import DecodePool
    from model.preprocess import Preprocessor

    pre = Preprocessor(image_size, (0.5,) * 3, (0.5,) * 3)
    one, two = DecodePool(1, image_size), DecodePool(2, image_size)

    async def concurrently() -> None:
        await asyncio.gather(*map(two.preprocess_async, images))

    runs = {"in process": lambda: [pre.array(d) for d in images],
            "pool of 1 worker": lambda: [one.preprocess(d) for d in images],
            "pool of 2 workers, concurrent": lambda: asyncio.run(concurrently())}  # fmt: skip
    best = {}
    try:
        for name, run in runs.items():
            run()  # warm-up: caches, the workers' first images
            seconds = min(_wall(run)[0] for _ in range(repeats))
            best[name] = len(images) / seconds
    finally:
        one.close()
        two.close()
    return best


def main(before: str | None, images: int = 200, image_size: int = 224, repeats: int = 3) -> int:
    from PIL import Image

    from model.decode_pool import DecodePool
    from model.preprocess import check_structure

    h = _hostile()
    print("A. hostile files: API check and replica decode, before (CPU s) and after (s until the answer)")
    old = _load(before) if before else None
    checker, pool = DecodePool(1), DecodePool(1, image_size)
    try:
        for name, data in hostile_files(h).items():
            row = f"  {name} ({len(data) / 2**20:.1f} MiB):"
            if old is not None:
                check_s, _ = _cpu(lambda data=data: _old_api_check(data))
                decode_s, was = _cpu(lambda data=data: old.Preprocessor(image_size, (0.5,) * 3, (0.5,) * 3)(data))
                row += f" before check {check_s:.2f} + decode {decode_s:.2f} ({was});"
            check_s, refused = _wall(lambda data=data: checker.check(data))
            decode_s, answer = _wall(lambda data=data: pool.preprocess(data))
            print(f"{row} after check {check_s:.3f} ({refused}) + decode {decode_s:.3f} ({answer})", flush=True)
    finally:
        checker.close()
        pool.close()

    print("B. the structure scan alone, 32 MiB files made to be slow to scan")
    for name, data in slow_scans(h).items():
        seconds, outcome = _wall(lambda data=data: check_structure(data))
        print(f"  {name}: {seconds:.3f} s ({outcome})", flush=True)

    print(f"C. {images} JPEGs of 512 px to {image_size} px, images/s (best of {repeats})")
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(images):
        y, x = np.mgrid[0:512, 0:512]
        a = np.stack([(x + 3 * i) % 256, (y + 5 * i) % 256, (x ^ y) % 256], axis=-1).astype(np.int16)
        a += rng.integers(-12, 13, size=a.shape, dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    rates = throughput(jpegs, image_size, repeats)
    base = rates["in process"]
    for name, rate in rates.items():
        print(f"  {name}: {rate:.0f} images/s ({rate / base:.2f} x in process)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="model/preprocess.py of the code before (default: after only)")
    parser.add_argument("--images", type=int, default=200, help="JPEGs for the throughput (default: 200)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size, px (default: 224)")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs, the best kept (default: 3)")
    a = parser.parse_args()
    sys.exit(main(a.before, a.images, a.image_size, a.repeats))
