"""A small synthetic Dan:mul dataset and an untrained checkpoint for it: what the benchmarks, the tests
and the demo's throughput figures run on when the behaviour under test does not depend on trained weights.
One way to make them, so every caller gets the same thing."""

from __future__ import annotations


def synthetic_dataset(out: str, characters: int, images: int, image_size: int, seed: int = 0,
                      workers: int | None = None) -> str:
    """Generate a synthetic Dan:mul dataset into ``out`` (a folder or s3:// URI); returns ``out``."""
    from ingest.synth import SynthConfig, synthesize

    extra = {} if workers is None else {"workers": workers}
    synthesize(SynthConfig(out=out, characters=characters, images=images, image_size=image_size, seed=seed,
                           **extra), progress=False)  # fmt: skip
    return out


def untrained_checkpoint(data: str, out: str, image_size: int, seed: int = 0) -> str:
    """The tiny preset with random weights (seeded) and the dataset's labels, saved as a checkpoint in
    ``out``; returns ``out``."""
    import torch

    from ingest.shards import load_info
    from ingest.storage import Storage
    from model.checkpoint import Labels, save
    from model.config import preset
    from model.network import DanmulNet

    info = load_info(Storage(data))
    torch.manual_seed(seed)
    net = DanmulNet(preset("tiny", num_characters=info.num_characters, num_tags=len(info.tags), image_size=image_size))
    save(out, net, Labels(info.characters, info.tags))
    return out


def rows(data: str) -> list[dict]:
    """Every example of every split, in order."""
    from ingest.shards import iter_examples
    from ingest.storage import Storage

    return [r for split in ("train", "val", "test") for r in iter_examples(Storage(data), split)]


def illustration(rng, width: int, height: int):
    """An illustration-like RGB picture (PIL): a smooth background, flat shapes with dark outlines and lines
    (the hard edges where decoders differ most), a little noise. Fast: a few ms at 512 px."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height),
                                                                                   Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)
    ink = (20, 20, 30)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * width, y0 + rng.uniform(0.05, 0.6) * height
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            d.ellipse([x0, y0, x1, y1], fill=fill, outline=ink, width=int(rng.integers(1, 4)))
        elif kind == 1:
            d.rectangle([x0, y0, x1, y1], fill=fill, outline=ink, width=int(rng.integers(1, 4)))
        else:
            d.polygon([(x0 + rng.uniform() * (x1 - x0), y0 + rng.uniform() * (y1 - y0)) for _ in range(5)], fill=fill,
                      outline=ink)
    for _ in range(int(rng.integers(2, 8))):
        d.line([(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(4)], fill=ink,
               width=int(rng.integers(1, 3)))
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def sample_jpegs(n: int, long_side: int = 512, seed: int = 0, max_aspect: float = 3.0) -> list[bytes]:
    """``n`` distinct baseline JPEGs like Danbooru's 512px set: the long side ``long_side``, aspect ratios
    log-uniform up to ``max_aspect`` either way (some beyond the aspect rule's 2.5), quality 75-95, chroma
    4:4:4, 4:2:2 or 4:2:0."""
    import io

    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        aspect = float(np.exp(rng.uniform(-np.log(max_aspect), np.log(max_aspect))))  # width / height
        w, h = (long_side, max(8, round(long_side / aspect))) if aspect >= 1 else (max(8, round(long_side * aspect)),
                                                                                    long_side)
        buf = io.BytesIO()
        illustration(rng, w, h).save(buf, format="JPEG", quality=int(rng.integers(75, 96)),
                                     subsampling=int(rng.integers(0, 3)))
        out.append(buf.getvalue())
    return out
