"""The Dan:mul shard contract (DESIGN.md, "Dan:mul shards"): Parquet columns and ``dataset.json``.

A dataset is a folder or prefix holding ``dataset.json`` and ``{train,val,test}/part-NNNNN.parquet``.
``dataset.json`` is written last, so a dataset without it is incomplete.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

SPLITS = ("train", "val", "test")
RATINGS = ("g", "s", "q", "e")
DATASET_JSON = "dataset.json"
FORMAT_VERSION = 1

SHARD_SCHEMA = pa.schema(
    [
        pa.field("post_id", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes as stored (JPEG/PNG/WebP)
        pa.field("character", pa.string(), nullable=False),
        pa.field("tags", pa.list_(pa.string()), nullable=False),  # general tags kept, sorted
        pa.field("copyright", pa.list_(pa.string()), nullable=False),
        pa.field("rating", pa.string()),  # g, s, q, e; null when the source had none
    ]
)


def shard_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


@dataclass
class FilterStep:
    """One step of the construction and what it removed (posts, and classes where relevant)."""

    name: str
    description: str
    removed_posts: int = 0
    removed_classes: int = 0
    detail: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # e.g. "posts0.json:17 malformed_json"


@dataclass
class DatasetInfo:
    """The contents of ``dataset.json``. Index in ``characters`` = class id; in ``tags`` = tag id."""

    source: str  # "danbooru" or "synthetic"
    characters: list[str]
    tags: list[str]
    num_images: int
    num_characters: int
    avg_tags_per_image: float
    splits: dict[str, int]  # images per split
    character_counts: list[int]  # images per class, aligned with ``characters``
    tag_counts: list[int]  # posts carrying each tag, aligned with ``tags``
    copyrights: list[str] = field(default_factory=list)
    filters: list[FilterStep] = field(default_factory=list)
    shards: dict[str, list[str]] = field(default_factory=dict)  # split -> relative shard paths
    config: dict[str, Any] = field(default_factory=dict)  # the settings that built it
    format_version: int = FORMAT_VERSION

    @property
    def tag_vocab_size(self) -> int:
        return len(self.tags)

    def to_json(self) -> str:
        d = asdict(self)
        d["tag_vocab_size"] = self.tag_vocab_size
        return json.dumps(d, indent=1, sort_keys=False)


def post_id_from_name(path: str) -> int | None:
    """The post id an image file is named after (Danbooru's ``512px/0123/123.jpg`` -> 123), or None when
    the file name is not a number. One rule for every front end that takes files (enqueue, backfill)."""
    stem = posixpath.splitext(posixpath.basename(path))[0]
    return int(stem) if stem.isascii() and stem.isdigit() else None
