"""Writing and reading Dan:mul datasets: bounded-size Parquet shards, splits, ``dataset.json``.

Both ``danmul data build`` (real Danbooru metadata) and ``danmul data synth`` (generated images) write
through :class:`DatasetWriter`, so every later stage reads either the same way.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ingest.schema import DATASET_JSON, SHARD_SCHEMA, SPLITS, DatasetInfo, FilterStep, shard_name
from ingest.storage import Storage

DEFAULT_SHARD_MB = 256  # bytes of images per shard file, before Parquet overhead
DEFAULT_ROW_GROUP_ROWS = 1024  # rows buffered in memory before a row group is written
ROW_GROUP_BYTES = 64 << 20  # ... or this many bytes of images, whichever comes first


@dataclass(frozen=True)
class Example:
    post_id: int
    image: bytes
    character: str
    tags: list[str]
    copyright: list[str]
    rating: str | None


# -- splits ----------------------------------------------------------------------------------------


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1); must be three non-negative numbers summing to 1."""
    parts = [float(x) for x in (text.split(",") if isinstance(text, str) else text)]
    if len(parts) != 3 or any(p < 0 for p in parts) or not math.isclose(sum(parts), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {text!r}")
    if parts[0] == 0:
        raise ValueError("the train fraction must be positive: every class needs training images")
    return parts[0], parts[1], parts[2]


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Images per split for a class of ``n``: val and test rounded, train the rest and at least 1."""
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    while n - n_val - n_test < 1 and (n_val or n_test):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def _unit_hash(seed: int, post_id: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{post_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class SplitAssigner:
    """Per-class train/val/test assignment in one streaming pass, with exact sizes per class.

    Knowing each class's total up front, the k-th post of a class draws its split with probability
    proportional to the slots each split has left (sequential sampling without replacement). The draw
    is a hash of (seed, post_id), so the split is a pure function of the seed and the input order; and
    memory is three counters per class, not per post.
    """

    def __init__(self, class_totals: dict[str, int], fractions: tuple[float, float, float], seed: int):
        self.seed = seed
        self._left = {c: list(split_sizes(n, fractions)) for c, n in class_totals.items()}

    def assign(self, character: str, post_id: int) -> str:
        left = self._left[character]
        total = sum(left)
        if total == 0:
            raise ValueError(f"more posts of {character!r} than its declared total")
        u = _unit_hash(self.seed, post_id) * total
        for i, n in enumerate(left):
            if u < n:
                left[i] -= 1
                return SPLITS[i]
            u -= n
        i = max(i for i, n in enumerate(left) if n > 0)  # float rounding at the top edge
        left[i] -= 1
        return SPLITS[i]


# -- writing ---------------------------------------------------------------------------------------


class _ShardSeries:
    """Writes one split as part-00000, part-00001, ... each holding at most ``max_bytes`` of images."""

    def __init__(self, storage: Storage, split: str, max_bytes: int, row_group_rows: int):
        self.storage, self.split = storage, split
        self.max_bytes, self.row_group_rows = max_bytes, row_group_rows
        self.files: list[str] = []
        self._rows: list[Example] = []
        self._buffered_bytes = 0
        self._file_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink = None

    def add(self, ex: Example) -> None:
        size = len(ex.image)
        if self._file_bytes + self._buffered_bytes + size > self.max_bytes:
            # this row would overflow the open shard: finish it; the row starts the next one
            self._flush()
            self._close_file()
        self._rows.append(ex)
        self._buffered_bytes += size
        if len(self._rows) >= self.row_group_rows or self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            name = shard_name(self.split, len(self.files))
            self._sink = self.storage.open_output(name)
            self._writer = pq.ParquetWriter(self._sink, SHARD_SCHEMA, compression="zstd")
            self.files.append(name)
        self._writer.write_table(_to_table(self._rows))
        self._file_bytes += self._buffered_bytes
        self._rows, self._buffered_bytes = [], 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer, self._sink = None, None
        self._file_bytes = 0

    def close(self) -> list[str]:
        self._flush()
        self._close_file()
        return self.files


def _to_table(rows: Sequence[Example]) -> pa.Table:
    return pa.table(
        {
            "post_id": [r.post_id for r in rows],
            "image": [r.image for r in rows],
            "character": [r.character for r in rows],
            "tags": [sorted(r.tags) for r in rows],
            "copyright": [sorted(r.copyright) for r in rows],
            "rating": [r.rating for r in rows],
        },
        schema=SHARD_SCHEMA,
    )


class DatasetWriter:
    """Streams examples into per-split shard series and writes ``dataset.json`` on :meth:`close`.

    Keeps only counters (per class, per tag) besides one row group per split in flight.
    """

    def __init__(
        self,
        out: Storage,
        source: str,
        shard_mb: float = DEFAULT_SHARD_MB,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        overwrite: bool = False,
    ):
        if out.exists(DATASET_JSON) and not overwrite:
            raise FileExistsError(f"{out.uri} already holds a dataset (pass overwrite to replace it)")
        for split in SPLITS:  # a half-written earlier attempt must not leave stray shards behind
            out.delete_prefix(split)
        out.delete(DATASET_JSON)
        self.out, self.source = out, source
        max_bytes = max(1, int(shard_mb * (1 << 20)))
        self._series = {s: _ShardSeries(out, s, max_bytes, row_group_rows) for s in SPLITS}
        self.split_counts: Counter[str] = Counter()
        self.character_counts: Counter[str] = Counter()
        self.tag_counts: Counter[str] = Counter()
        self.copyright_counts: Counter[str] = Counter()
        self.total_tags = 0

    def add(self, ex: Example, split: str) -> None:
        self._series[split].add(ex)
        self.split_counts[split] += 1
        self.character_counts[ex.character] += 1
        self.tag_counts.update(ex.tags)
        self.copyright_counts.update(ex.copyright)
        self.total_tags += len(ex.tags)

    def close(
        self,
        filters: Iterable[FilterStep] = (),
        config: dict | None = None,
        tag_vocab: Sequence[str] | None = None,
    ) -> DatasetInfo:
        """Finish every shard and write ``dataset.json``. ``tag_vocab`` fixes the tag list (by default
        every tag seen, most frequent first)."""
        shards = {s: series.close() for s, series in self._series.items()}
        characters = _by_frequency(self.character_counts)
        tags = list(tag_vocab) if tag_vocab is not None else _by_frequency(self.tag_counts)
        n = sum(self.split_counts.values())
        info = DatasetInfo(
            source=self.source,
            characters=characters,
            tags=tags,
            num_images=n,
            num_characters=len(characters),
            avg_tags_per_image=round(self.total_tags / n, 3) if n else 0.0,
            splits={s: self.split_counts[s] for s in SPLITS},
            character_counts=[self.character_counts[c] for c in characters],
            tag_counts=[self.tag_counts[t] for t in tags],
            copyrights=_by_frequency(self.copyright_counts),
            filters=list(filters),
            shards=shards,
            config=dict(config or {}),
        )
        self.out.write_text(DATASET_JSON, info.to_json())
        return info


def _by_frequency(counts: Counter[str]) -> list[str]:
    return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


# -- reading ---------------------------------------------------------------------------------------


def load_info(data: Storage | str) -> DatasetInfo:
    storage = data if isinstance(data, Storage) else Storage(data)
    if not storage.exists(DATASET_JSON):
        raise FileNotFoundError(f"{storage.uri} has no {DATASET_JSON}: not a Dan:mul dataset, or incomplete")
    return DatasetInfo.from_json(storage.read_text(DATASET_JSON))


def shard_paths(data: Storage, split: str) -> list[str]:
    """Relative paths of one split's shards (from ``dataset.json``, else by listing)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    info = load_info(data)
    return info.shards.get(split) or [f"{split}/{e.path}" for e in data.list(split, suffixes=(".parquet",))]


def iter_examples(data: Storage, split: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows of one split as dicts, one row group at a time (bounded memory)."""
    for rel in shard_paths(data, split):
        pf = data.parquet_file(rel)
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=columns).to_pylist()
