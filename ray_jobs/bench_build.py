"""``danmul bench build``: the Dan:mul builder on generated Danbooru2021-like metadata.

Writes N metadata lines with the mess real dumps have (malformed lines, ids and booleans as strings,
both tag encodings, deleted/banned posts, posts with zero or several characters), an image tree of
hard links to a few small JPEGs, then runs ``data build`` on it in a fresh process per size and
reports lines/s and the process's peak memory. Peak memory must stay flat across sizes: the
builder streams the metadata.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

N_CHARACTERS = 20_000
N_GENERAL = 30_000
N_COPYRIGHT = 2_000
N_ARTISTS = 10_000
LINKS_PER_SOURCE = 50_000  # ext4 allows 65,000 hard links to one file


@dataclass
class FakeDanbooru:
    metadata: str  # folder of posts*.json files
    images: str  # 512px tree root
    lines: int


def _zipf_index(rng: np.random.Generator, n: int, size: int, a: float = 1.3) -> np.ndarray:
    return (rng.zipf(a, size=size) - 1) % n


def _jpegs(count: int, size: int = 32) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.new("RGB", (size, size), (30 * i % 256, 80, 200 - 20 * i)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def write_fake_danbooru(workdir: str, n_lines: int, seed: int = 0, files: int = 4,
                        image_rate: float = 0.9) -> FakeDanbooru:
    """Generate metadata and an image tree under ``workdir``; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    meta_dir = os.path.join(workdir, "metadata")
    img_dir = os.path.join(workdir, "512px")
    os.makedirs(meta_dir, exist_ok=True)
    sources = []
    for i, data in enumerate(_jpegs(n_lines // LINKS_PER_SOURCE + 8)):
        path = os.path.join(workdir, f"source-{i}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        sources.append(path)
    made_dirs: set[str] = set()
    per_file = -(-n_lines // files)
    block = 10_000
    post_id = 0
    for fi in range(files):
        n_here = min(per_file, n_lines - fi * per_file)
        with open(os.path.join(meta_dir, f"posts{fi:012d}.json"), "w") as out:
            for start in range(0, n_here, block):
                k = min(block, n_here - start)
                chars = _zipf_index(rng, N_CHARACTERS, k)
                n_chars = rng.choice([0, 1, 1, 1, 1, 1, 2, 3], size=k)
                u = rng.random((k, 4))
                for j in range(k):
                    post_id += 1
                    if u[j, 0] < 0.005:
                        out.write('{"id": "' + str(post_id) + '", "tags": [broken\n')
                        continue
                    if u[j, 0] < 0.007:
                        out.write('{"rating": "s", "tag_string_general": "1girl"}\n')  # no id
                        continue
                    names = [f"character_{(chars[j] + m * 7919) % N_CHARACTERS}" for m in range(n_chars[j])]
                    general = [f"tag_{t}" for t in np.unique(_zipf_index(rng, N_GENERAL, 30, 1.15))]
                    post = _post(post_id, names, general, rng, legacy=u[j, 1] < 0.4)
                    if u[j, 2] < 0.02:
                        post["is_deleted"] = "true" if u[j, 3] < 0.5 else True
                    elif u[j, 2] < 0.025:
                        post["is_banned"] = True
                    out.write(json.dumps(post) + "\n")
                    if u[j, 3] < image_rate:
                        d = os.path.join(img_dir, f"{post_id % 1000:04d}")
                        if d not in made_dirs:
                            os.makedirs(d, exist_ok=True)
                            made_dirs.add(d)
                        os.link(sources[post_id % len(sources)], os.path.join(d, f"{post_id}.jpg"))
    return FakeDanbooru(metadata=meta_dir, images=img_dir, lines=n_lines)


def _post(post_id: int, characters: list[str], general: list[str], rng: np.random.Generator,
          legacy: bool) -> dict:
    copyright_ = [f"series_{int(rng.integers(N_COPYRIGHT))}"]
    artist = [f"artist_{int(rng.integers(N_ARTISTS))}"]
    meta = ["highres"] if rng.random() < 0.5 else []
    rating = str(rng.choice(["s", "q", "e", "g"]))
    if legacy:  # Danbooru2017-2020: a tags list, categories and ids as strings
        tags = [{"id": "0", "name": n, "category": str(c)}
                for c, names in ((0, general), (1, artist), (3, copyright_), (4, characters), (5, meta))
                for n in names]
        return {"id": str(post_id), "rating": rating, "is_deleted": False, "tags": tags}
    return {
        "id": post_id,
        "rating": rating,
        "is_deleted": False,
        "is_banned": "false",
        "tag_string_general": " ".join(general),
        "tag_string_artist": " ".join(artist),
        "tag_string_copyright": " ".join(copyright_),
        "tag_string_character": " ".join(characters),
        "tag_string_meta": " ".join(meta),
    }


def _run_one(metadata: str, images: str, out: str) -> dict:
    """In this (fresh) process: build, and report seconds and peak resident memory."""
    import resource

    from ingest.build import BuildConfig, build

    cfg = BuildConfig(metadata=metadata, images=images, out=out, overwrite=True)
    result = build(cfg, progress=False, log=lambda s: None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "lines": result.lines,
        "seconds": result.seconds,
        "images": result.info.num_images,
        "classes": result.info.num_characters,
        "peak_mib": peak_kib / 1024,
    }


def main(sizes: list[int], workdir: str | None = None, keep: bool = False) -> int:
    root = workdir or tempfile.mkdtemp(prefix="danmul-bench-build-")
    rows = []
    try:
        for n in sizes:
            here = os.path.join(root, f"{n}")
            shutil.rmtree(here, ignore_errors=True)
            t0 = time.perf_counter()
            fake = write_fake_danbooru(here, n)
            print(f"generated {n:,} metadata lines and their image tree in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            child = subprocess.run(
                [sys.executable, "-m", "ray_jobs.bench_build", fake.metadata, fake.images,
                 os.path.join(here, "out")],
                check=True, capture_output=True, text=True,
            )
            row = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {row['lines']:,} lines: {row['lines'] / row['seconds']:,.0f} lines/s, "
                  f"peak {row['peak_mib']:.0f} MiB, {row['images']:,} images, {row['classes']:,} classes",
                  flush=True)
            if not keep:
                shutil.rmtree(here, ignore_errors=True)
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| metadata lines | seconds | lines/s | peak memory (MiB) | images kept | classes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lines']:,} | {r['seconds']:.1f} | {r['lines'] / r['seconds']:,.0f} | {r['peak_mib']:.0f} "
              f"| {r['images']:,} | {r['classes']:,} |")
    if len(rows) >= 2:
        growth = rows[-1]["peak_mib"] / rows[0]["peak_mib"] - 1
        print(f"\npeak memory {rows[-1]['lines']:,} vs {rows[0]['lines']:,} lines: {growth:+.1%} (goal: within 20%)")
    return 0


if __name__ == "__main__":
    print(json.dumps(_run_one(*sys.argv[1:4])))
