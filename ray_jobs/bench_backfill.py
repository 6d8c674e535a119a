"""``danmul bench backfill``: the Ray Data backfill against the bare model, and its memory as the archive grows.

One machine, one run:
  A. the bare model: ``Tagger.predict`` in batches over the same encoded images (decode + preprocess +
     inference in one process, torch on every core);
  B. ``danmul backfill`` over an archive folder of those images (one file per post), in a fresh process
     per size; images/s in steady state (from the first results file written to the last), and the
     peak memory of the whole job (driver, Ray's daemons and workers: the sum of their proportional
     set sizes, sampled every 0.25 s).
Goals: B/A at least 0.85 on CPU; peak memory at the largest size within 20% of the smallest's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil


def _tree_pss(root: psutil.Process) -> int:
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return total


def run_job(args: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run a command; returns it and the peak PSS of its process tree."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], _tree_pss(root))
            except psutil.NoSuchProcess:
                return
            stop.wait(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    return subprocess.CompletedProcess(args, proc.returncode, out, err), peak[0]


def steady_rate(out: str) -> float:
    """Images/s between the first and the last results file (start-up excluded)."""
    import pyarrow.parquet as pq

    folder = os.path.join(out, "results")
    files = sorted((os.path.getmtime(os.path.join(folder, f)), os.path.join(folder, f)) for f in os.listdir(folder))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for _, f in files[1:])
    return rows / max(1e-3, files[-1][0] - files[0][0])


def main(sizes: list[int], batch_size: int = 64, image_size: int = 64) -> int:
    from ray_jobs.bench_stream import bare_model
    from ray_jobs.samples import rows, synthetic_dataset, untrained_checkpoint

    root = tempfile.mkdtemp(prefix="danmul-bench-backfill-")
    data = os.path.join(root, "data")
    synthetic_dataset(data, characters=24, images=600, image_size=image_size)
    images = [r["image"] for r in rows(data)]
    ckpt = untrained_checkpoint(data, os.path.join(root, "model"), image_size)
    bare = bare_model(ckpt, images, [None] * len(images), batch_size)
    print(f"A. bare Tagger.predict, batches of {batch_size}: {bare:,.0f} images/s", flush=True)

    rows = []
    for n in sizes:
        archive = os.path.join(root, f"archive-{n}")
        for i in range(n):  # Danbooru-like layout: 1,000 folders at most
            folder = os.path.join(archive, f"{i % 1000:04d}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{i + 1}.jpg"), "wb") as f:
                f.write(images[i % len(images)])
        out = os.path.join(root, f"out-{n}")
        t0 = time.perf_counter()
        proc, peak = run_job([sys.executable, "-m", "ray_jobs.cli", "backfill", "--input", archive, "--checkpoint",
                              ckpt, "--out", out, "--batch-size", str(batch_size), "--no-progress"])  # fmt: skip
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        rate = steady_rate(out)
        rows.append((n, rate, peak, time.perf_counter() - t0))
        print(f"B. backfill of {n:,} images: {rate:,.0f} images/s in steady state, peak memory "
              f"{peak / 2**20:,.0f} MiB", flush=True)
    cores = os.cpu_count()
    print(f"\ntiny preset at {image_size}px, {cores} CPU cores, batch {batch_size}, archive folder of JPEG/PNG/WebP "
          "files:\n")
    print("| images | backfill images/s | / bare model | peak memory (all processes) | wall time |")
    print("|---|---|---|---|---|")
    for n, rate, peak, wall in rows:
        print(f"| {n:,} | {rate:,.0f} | {rate / bare:.2f} | {peak / 2**20:,.0f} MiB | {wall:,.0f} s |")
    print(f"\nbare Tagger.predict loop: {bare:,.0f} images/s (goal: backfill at least 0.85 of it)")
    if len(rows) > 1:
        print(f"peak memory, {rows[-1][0]:,} vs {rows[0][0]:,} images: {rows[-1][2] / rows[0][2] - 1:+.1%} "
              "(goal: within 20%)")
    return 0
