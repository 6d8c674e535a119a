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
