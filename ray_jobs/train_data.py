"""What ``danmul train`` feeds its workers: a split's shard rows as a Ray dataset, decoded, augmented and
encoded into model inputs by Ray Data's CPU tasks (:func:`decode_batch`, on :func:`model.batch.encode`).

Kept apart from :mod:`ray_jobs.train` so that every Ray process that only holds or runs the data
pipeline (Ray Data's map tasks, Ray Train's split coordinator and dataset manager) imports this
module's few dependencies (numpy, PIL, torch) and not the network's (timm, torchvision): each such
import costs seconds of CPU in every process that does it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from ingest.schema import SHARD_SCHEMA, DatasetInfo
from ingest.storage import Storage
from model.batch import encode
from model.config import ModelConfig
from model.preprocess import ImageError, TrainAugment, decode
from model.vocab import TagVocab

KEEP_READ_MAX_BYTES = 1 << 30  # splits up to this many bytes of shards are read once per run (kept in Ray)
COLUMNS = ["image", "character", "tags"]


def decode_batch(batch: dict[str, np.ndarray], characters: list[str], tags: list[str], image_size: int,
                 mean: list[float], std: list[float], max_tags: int, augment: bool) -> dict[str, np.ndarray]:
    """Shard rows -> model inputs (:func:`model.batch.encode`). A row whose image does not decode keeps
    its place with ``ok = 0``, so the training worker can count it and skip it."""
    class_of = {c: i for i, c in enumerate(characters)}
    images = []
    for data in batch["image"]:
        try:
            images.append(decode(bytes(data)))
        except ImageError:
            images.append(None)
    return encode(images, batch["tags"], [class_of.get(str(c), -1) for c in batch["character"]], TagVocab(tags),
                  image_size, mean, std, max_tags, TrainAugment() if augment else None)


BLOCK_MAX_BYTES = 64 << 20  # a shard read once is cut into blocks of at most this many bytes: decoding tasks


def _read_shard(storage: Storage, rel: str) -> pa.Table:
    """One shard's training columns, in the shard schema's types; a shard without them, or with a null
    where the schema has none, is an error that names it."""
    target = pa.schema([SHARD_SCHEMA.field(name) for name in COLUMNS])
    try:
        return storage.read_parquet(rel, columns=COLUMNS).select(COLUMNS).cast(target)
    except (KeyError, ValueError, TypeError, pa.ArrowException) as e:  # ArrowInvalid/TypeError among them
        raise ValueError(f"{storage.uri_of(rel)}: not a Dan:mul shard ({e})") from e


def _put_blocks(table: pa.Table) -> list:
    """``table`` into the object store as blocks of at most :data:`BLOCK_MAX_BYTES` (slices, no copy):
    each block is one decoding task per pass, so a big shard still decodes on several CPUs."""
    import ray

    if not table.num_rows:
        return []
    pieces = max(1, -(-table.nbytes // BLOCK_MAX_BYTES))
    rows = -(-table.num_rows // pieces)
    return [ray.put(table.slice(start, rows)) for start in range(0, table.num_rows, rows)]


def _is_shard(path: str) -> bool:
    """A file Ray Data's ``read_parquet`` would read in a split folder: a ``.parquet`` name (any case), no
    part of its path hidden or temporary (``.name``, ``_name``, as a Spark ``_temporary`` folder)."""
    return path.lower().endswith(".parquet") and not any(part[:1] in "._" for part in path.split("/"))


def split_shards(storage: Storage, split: str) -> list:
    """The shard files of a split folder, as training reads them (``_is_shard``), in listing order."""
    return [f for f in storage.list(split) if _is_shard(f.path)]


def read_split(storage: Storage, split: str):
    """The split's shard rows (image, character, tags) as a Ray dataset, and whether they were read
    once and kept. A small split (its shards' bytes on storage, not dataset.json's counts, which a foreign
    dataset may get wrong) is read here, one shard at a time per thread, each put in the object store as
    soon as it is read (the driver holds a few shards at once, not the split), and kept there: every
    pass would otherwise list the files and start Ray Data's footer-reading actors (processes) again,
    which on a small split costs more than the training it feeds. A larger split streams from storage."""
    import ray.data

    shards = split_shards(storage, split)
    if sum(f.size for f in shards) > KEEP_READ_MAX_BYTES:
        return ray.data.read_parquet(storage.path(split), filesystem=storage.fs).select_columns(COLUMNS), False
    if not shards:
        raise FileNotFoundError(f"no shards under {storage.uri_of(split)}")
    with ThreadPoolExecutor(8) as pool:  # object storage answers each read after a round trip: several at once
        blocks = pool.map(lambda f: _put_blocks(_read_shard(storage, f"{split}/{f.path}")), shards)
        refs = [ref for shard in blocks for ref in shard]
    if not refs:
        raise ValueError(f"the shards under {storage.uri_of(split)} hold no rows")
    return ray.data.from_arrow_refs(refs), True


def model_inputs(rows, info: DatasetInfo, mcfg: ModelConfig, augment: bool, repeat: int = 1):
    """Shard rows as model inputs; with ``repeat`` > 1 one pass goes over the rows that many times
    (each time freshly augmented and shuffled)."""
    if repeat > 1:
        rows = rows.union(*[rows] * (repeat - 1))
    return rows.map_batches(
        decode_batch, batch_size=64, batch_format="numpy",
        fn_kwargs=dict(characters=info.characters, tags=info.tags, image_size=mcfg.image_size,
                       mean=list(mcfg.mean), std=list(mcfg.std), max_tags=mcfg.max_tags, augment=augment),
    )  # fmt: skip


def make_dataset(storage: Storage, split: str, info: DatasetInfo, mcfg: ModelConfig, augment: bool,
                 repeat: int = 1):
    """The split as model inputs (:func:`read_split`, then :func:`model_inputs`)."""
    return model_inputs(read_split(storage, split)[0], info, mcfg, augment, repeat)


def train_images(rows, kept: bool, declared: int, log=print) -> int:
    """The number of train images to plan with: counted when the rows were read (free then), else
    what dataset.json declares. A count that differs from the declared one is said, once."""
    if not kept:
        return declared
    counted = rows.count()
    if counted != declared:
        log(f"dataset.json declares {declared:,} train images, its shards hold {counted:,} rows: "
            "planning with the rows")
    return counted
