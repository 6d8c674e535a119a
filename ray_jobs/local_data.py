"""In-memory batches from a (small) Dan:mul split, for single-process training and evaluation: the
paper-claim script, the demo's quick checks and the model behaviour tests. The Ray Train job streams
the same batches through Ray Data instead of holding a split in memory.

Images are decoded once (bad ones are skipped and counted); augmentation and tensor conversion
happen per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from PIL import Image

from ingest.schema import DatasetInfo
from ingest.shards import iter_examples, load_info
from ingest.storage import Storage
from model.batch import encode, model_batch
from model.config import ModelConfig
from model.preprocess import ImageError, TrainAugment, decode
from model.vocab import TagVocab


@dataclass
class Split:
    images: list[Image.Image]
    tags: list[list[str]]
    characters: np.ndarray  # class ids
    post_ids: np.ndarray
    skipped: int  # undecodable images


def _decoded(storage: Storage, split: str, info: DatasetInfo, skipped: list[int]) -> Iterator[tuple]:
    """``(image, tags, class id, post id)`` per decodable row, in shard order; undecodable images are
    skipped and counted in ``skipped[0]``."""
    class_of = {c: i for i, c in enumerate(info.characters)}
    for row in iter_examples(storage, split, columns=["post_id", "image", "character", "tags"]):
        try:
            img = decode(row["image"])
        except ImageError:
            skipped[0] += 1
            continue
        yield img, row["tags"], class_of[row["character"]], row["post_id"]


def _split_of(rows: list[tuple], skipped: int = 0) -> Split:
    images, tags, chars, ids = (list(col) for col in zip(*rows, strict=True)) if rows else ([], [], [], [])
    return Split(images, tags, np.asarray(chars, dtype=np.int64), np.asarray(ids, dtype=np.int64), skipped)


def load_split(data: Storage | str, split: str, info: DatasetInfo | None = None, limit: int | None = None) -> Split:
    storage = data if isinstance(data, Storage) else Storage(data)
    info = info or load_info(storage)
    skipped = [0]
    rows = list(islice(_decoded(storage, split, info, skipped), limit))
    return _split_of(rows, skipped[0])


def batches(split: Split, vocab: TagVocab, cfg: ModelConfig, batch_size: int, augment: TrainAugment | None = None,
            shuffle_seed: int | None = None, device: torch.device | str = "cpu",
            drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of batches (shuffled when ``shuffle_seed`` is given)."""
    n = len(split.images)
    order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        arrays = encode([split.images[i] for i in idx], [split.tags[i] for i in idx], split.characters[idx], vocab,
                        cfg.image_size, cfg.mean, cfg.std, cfg.max_tags, augment)
        yield model_batch(arrays, device)


def stream_batches(data: Storage, split: str, info: DatasetInfo, vocab: TagVocab, cfg: ModelConfig,
                   batch_size: int, device: torch.device | str = "cpu",
                   skipped: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches straight from the shards, one row group at a time: memory stays bounded whatever the
    split's size. Undecodable images are skipped; their count is added to ``skipped[0]``."""
    rows = _decoded(data, split, info, skipped if skipped is not None else [0])
    while chunk := list(islice(rows, batch_size)):
        yield from batches(_split_of(chunk), vocab, cfg, batch_size, device=device)
