"""Writing and reading Dan:mul datasets: bounded-size Parquet shards, splits, ``dataset.json``.

Both ``danmul data build`` (real Danbooru metadata) and ``danmul data synth`` (generated images) write
through :class:`DatasetWriter`, so every later stage reads either the same way.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ingest.schema import DATASET_JSON, FORMAT_VERSION, SHARD_SCHEMA, SPLITS, DatasetInfo, FilterStep, shard_name
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

# What DESIGN.md ("Dan:mul shards") promises every dataset.json holds, with a hint for the error message.
# A dataset made by another tool may hold only these: load_info derives the rest from the shards.
CONTRACT_FIELDS = {
    "characters": "the list of character tags, index = class id",
    "tags": "the list of general tags, index = tag id",
    "num_images": "the number of images",
    "num_characters": "the number of characters (classes)",
    "avg_tags_per_image": "the mean number of general tags per image",
    "splits": 'images per split, e.g. {"train": 900, "val": 50, "test": 50}',
    "filters": 'the filters applied with what each removed, e.g. [{"name": "min_images", "removed_posts": 12}]',
}
SHARD_PATTERN = "part-*.parquet"  # a split's shards, when dataset.json does not list them


def load_info(data: Storage | str) -> DatasetInfo:
    """``dataset.json``, checked field by field, with what a dataset made by another tool may leave out
    derived from its shards: the shard lists by listing ``{split}/part-*.parquet``, missing per-split counts
    from the shards' row counts, and ``character_counts``, ``tag_counts`` and ``copyrights`` from one pass
    over the shards' ``character``, ``tags`` and ``copyright`` columns (the images are not read).

    Raises FileNotFoundError without ``dataset.json``, and ValueError naming the file and the field when a
    field is missing, of the wrong type, negative, or disagrees with the shards or the other fields.
    """
    storage = data if isinstance(data, Storage) else Storage(data)
    return _read_info(storage, derive_counts=True)


def _read_info(storage: Storage, derive_counts: bool) -> DatasetInfo:
    if not storage.exists(DATASET_JSON):
        raise FileNotFoundError(f"{storage.uri} has no {DATASET_JSON}: not a Dan:mul dataset, or incomplete")
    where = storage.uri_of(DATASET_JSON)
    try:
        d = json.loads(storage.read_bytes(DATASET_JSON))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where} must hold a JSON object, not {_kind(d)}")
    return _InfoReader(storage, where, d).read(derive_counts)


def _kind(v: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _InfoReader:
    """Checks one parsed ``dataset.json`` and fills in what it may leave out."""

    def __init__(self, storage: Storage, where: str, d: dict):
        self.storage, self.where, self.d = storage, where, d

    def fail(self, field: str, problem: str) -> NoReturn:
        raise ValueError(f"{self.where}: field {field!r} {problem}")

    def require(self, name: str) -> object:
        if name not in self.d:
            raise ValueError(f"{self.where}: missing field {name!r} ({CONTRACT_FIELDS[name]})")
        return self.d[name]

    # -- types ------------------------------------------------------------------------------------
    def names(self, field: str, v: object, unique: bool = True) -> list[str]:
        if not isinstance(v, list):
            self.fail(field, f"must be a list of strings, not {_kind(v)}")
        seen: dict[str, int] = {}
        for i, x in enumerate(v):
            if not isinstance(x, str) or not x:
                self.fail(field, f"must be a list of non-empty strings; item {i} is {_kind(x) if x != '' else 'empty'}")
            if unique and x in seen:
                self.fail(field, f"lists {x!r} twice (items {seen[x]} and {i})")
            seen[x] = i
        return list(v)

    def count(self, field: str, v: object) -> int:
        if not _is_int(v):
            self.fail(field, f"must be a whole number, not {_kind(v)}")
        if v < 0:
            self.fail(field, f"must not be negative, got {v}")
        return v

    def counts(self, field: str, v: object, length: int, aligned_with: str) -> list[int]:
        if not isinstance(v, list):
            self.fail(field, f"must be a list of whole numbers, not {_kind(v)}")
        if len(v) != length:
            self.fail(field, f"has {len(v)} entries but {aligned_with!r} has {length}")
        return [self.count(f"{field}[{i}]", x) for i, x in enumerate(v)]

    def obj(self, field: str, v: object) -> dict:
        if not isinstance(v, dict):
            self.fail(field, f"must be an object, not {_kind(v)}")
        return v

    def text(self, field: str, v: object) -> str:
        if not isinstance(v, str):
            self.fail(field, f"must be a string, not {_kind(v)}")
        return v

    def filter_step(self, i: int, v: object) -> FilterStep:
        field = f"filters[{i}]"
        f = self.obj(field, v)
        if "name" not in f or "removed_posts" not in f:
            self.fail(field, "needs at least 'name' and 'removed_posts' (the posts it removed)")
        detail = self.obj(f"{field}.detail", f.get("detail", {}))
        return FilterStep(
            name=self.text(f"{field}.name", f["name"]),
            description=self.text(f"{field}.description", f.get("description", "")),
            removed_posts=self.count(f"{field}.removed_posts", f["removed_posts"]),
            removed_classes=self.count(f"{field}.removed_classes", f.get("removed_classes", 0)),
            detail={k: self.count(f"{field}.detail.{k}", n) for k, n in detail.items()},
            examples=self.names(f"{field}.examples", f.get("examples", []), unique=False),
        )

    def shard_lists(self, v: object) -> dict[str, list[str]]:
        """Shard paths must stay inside their split's folder of this dataset."""
        shards = self.obj("shards", v)
        for split, paths in shards.items():
            if split not in SPLITS:
                self.fail("shards", f"names an unknown split {split!r} (expected {', '.join(SPLITS)})")
            for p in self.names(f"shards.{split}", paths):
                parts = p.split("/")
                if (len(parts) < 2 or parts[0] != split or not p.endswith(".parquet") or "\\" in p
                        or any(part in ("", ".", "..") for part in parts)):
                    self.fail(f"shards.{split}", f"holds {p!r}: expected a relative path {split}/NAME.parquet")
        return {s: list(shards.get(s) or ()) for s in SPLITS}

    # -- the whole file -----------------------------------------------------------------------------
    def read(self, derive_counts: bool) -> DatasetInfo:
        d = self.d
        version = d.get("format_version", FORMAT_VERSION)
        if not _is_int(version) or version < 1:
            self.fail("format_version", f"must be a positive whole number, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"{self.where}: format {version} is newer than this danmul reads ({FORMAT_VERSION})")
        for name in CONTRACT_FIELDS:
            self.require(name)
        characters = self.names("characters", d["characters"])
        tags = self.names("tags", d["tags"])
        num_images = self.count("num_images", d["num_images"])
        num_characters = self.count("num_characters", d["num_characters"])
        if num_characters != len(characters):
            self.fail("num_characters", f"is {num_characters} but 'characters' lists {len(characters)}")
        avg = d["avg_tags_per_image"]
        if not isinstance(avg, int | float) or isinstance(avg, bool) or not math.isfinite(avg) or avg < 0:
            self.fail("avg_tags_per_image", f"must be a non-negative number, got {avg!r}")
        if "tag_vocab_size" in d and d["tag_vocab_size"] != len(tags):
            self.fail("tag_vocab_size", f"is {d['tag_vocab_size']!r} but 'tags' lists {len(tags)}")
        filters_v = d["filters"]
        if not isinstance(filters_v, list):
            self.fail("filters", f"must be a list of objects, not {_kind(filters_v)}")
        filters = [self.filter_step(i, f) for i, f in enumerate(filters_v)]
        split_v = self.obj("splits", d["splits"])
        for s in split_v:
            if s not in SPLITS:
                self.fail("splits", f"names an unknown split {s!r} (expected {', '.join(SPLITS)})")
        given = {s: self.count(f"splits.{s}", n) for s, n in split_v.items()}

        # a split the file does not list (or lists as [], as danmul does for an empty split) is found by
        # listing, as iter_examples would read it
        listed = self.shard_lists(d["shards"]) if "shards" in d else {}
        shards = {s: listed.get(s) or _list_shards(self.storage, s) for s in SPLITS}
        splits = {s: given[s] if s in given else self._rows(shards[s]) for s in SPLITS}
        if sum(splits.values()) != num_images:
            self.fail("splits", f"add up to {sum(splits.values())} images but 'num_images' is {num_images}")

        character_counts = (self.counts("character_counts", d["character_counts"], len(characters), "characters")
                            if "character_counts" in d else None)
        if character_counts is not None and sum(character_counts) != num_images:
            self.fail("character_counts", f"add up to {sum(character_counts)} but 'num_images' is {num_images}")
        tag_counts = self.counts("tag_counts", d["tag_counts"], len(tags), "tags") if "tag_counts" in d else None
        copyrights = self.names("copyrights", d["copyrights"]) if "copyrights" in d else None
        if derive_counts and (character_counts is None or tag_counts is None or copyrights is None):
            derived = self._scan(shards, characters, tags, splits)
            character_counts = derived[0] if character_counts is None else character_counts
            tag_counts = derived[1] if tag_counts is None else tag_counts
            copyrights = derived[2] if copyrights is None else copyrights

        return DatasetInfo(
            source=self.text("source", d.get("source", "unknown")),
            characters=characters,
            tags=tags,
            num_images=num_images,
            num_characters=num_characters,
            avg_tags_per_image=avg,
            splits=splits,
            character_counts=character_counts or [],
            tag_counts=tag_counts or [],
            copyrights=copyrights or [],
            filters=filters,
            shards=shards,
            config=self.obj("config", d.get("config", {})),
            format_version=version,
        )

    # -- from the shards ------------------------------------------------------------------------------
    def _open(self, rel: str) -> pq.ParquetFile:
        try:
            pf = self.storage.parquet_file(rel)
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"{self.storage.uri_of(rel)} (listed for {self.where}) cannot be read: {e}") from None
        schema = pf.schema_arrow
        missing = [c for c in SHARD_SCHEMA.names if c not in schema.names]
        if missing:
            raise ValueError(f"{self.storage.uri_of(rel)} lacks the column(s) {', '.join(missing)} of a Dan:mul shard "
                             f"({', '.join(SHARD_SCHEMA.names)})")
        for name, ok in _COLUMN_TYPES.items():
            if not ok(schema.field(name).type):
                raise ValueError(f"{self.storage.uri_of(rel)}: column {name!r} is {schema.field(name).type}, expected "
                                 f"{SHARD_SCHEMA.field(name).type}")
        return pf

    def _rows(self, rels: list[str]) -> int:
        return sum(self._open(rel).metadata.num_rows for rel in rels)

    def _scan(self, shards: dict[str, list[str]], characters: list[str], tags: list[str],
              splits: dict[str, int]) -> tuple[list[int], list[int], list[str]]:
        """Images per class, posts per tag and copyrights by frequency, from the shards' label columns, one
        row group at a time; the split sizes and the class list are checked against what the shards hold."""
        known = set(characters)
        chars: Counter[str] = Counter()
        tag_n: Counter[str] = Counter()
        copy_n: Counter[str] = Counter()
        for split in SPLITS:
            rows = 0
            for rel in shards[split]:
                pf = self._open(rel)
                for i in range(pf.num_row_groups):
                    t = pf.read_row_group(i, columns=["character", "tags", "copyright"])
                    rows += t.num_rows
                    chars.update(_value_counts(t["character"]))
                    tag_n.update(_value_counts(pc.list_flatten(t["tags"])))
                    copy_n.update(_value_counts(pc.list_flatten(t["copyright"])))
                if None in chars:
                    raise ValueError(f"{self.storage.uri_of(rel)} holds a row without a character")
                unknown = sorted(c for c in chars if c not in known)
                if unknown:
                    self.fail("characters", f"lacks {unknown[0]!r}, which {self.storage.uri_of(rel)} holds")
            if rows != splits[split]:
                self.fail("splits", f"gives {split} {splits[split]} images but its shards hold {rows}")
        copy_n.pop(None, None)  # a null inside a copyright list names nothing
        return [chars[c] for c in characters], [tag_n[t] for t in tags], _by_frequency(copy_n)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_text_list(t: pa.DataType) -> bool:  # list<null>: what pyarrow infers for lists that are all empty
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (_is_text(t.value_type)
                                                                   or pa.types.is_null(t.value_type))


# the contract's column types, up to the large_* and all-null variants another writer may produce
_COLUMN_TYPES = {
    "post_id": pa.types.is_integer,
    "image": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
    "character": _is_text,
    "tags": _is_text_list,
    "copyright": _is_text_list,
    "rating": lambda t: _is_text(t) or pa.types.is_null(t),
}


def _value_counts(arr: pa.Array | pa.ChunkedArray) -> dict:
    vc = pc.value_counts(arr)
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True))


def _list_shards(storage: Storage, split: str) -> list[str]:
    """A split's shards by listing: ``{split}/part-*.parquet``, in name order."""
    return [f"{split}/{e.path}" for e in storage.list(split, recursive=False)
            if fnmatch.fnmatchcase(e.path, SHARD_PATTERN)]


def shard_paths(data: Storage, split: str) -> list[str]:
    """Relative paths of one split's shards (from ``dataset.json``, else by listing)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    info = _read_info(data, derive_counts=False)  # the shard lists only: no pass over the shards
    return info.shards.get(split) or _list_shards(data, split)


# a row group whose sampled column is larger is not read for a sample (the builder's hold at most
# ROW_GROUP_BYTES plus one image); at most SAMPLE_GROUPS row groups are looked at
SAMPLE_CHUNK_BYTES = 128 << 20
SAMPLE_GROUPS = 16


def sample_column(data: Storage, rels: list[str], column: str, n: int, max_chunk_bytes: int = SAMPLE_CHUNK_BYTES,
                  max_groups: int = SAMPLE_GROUPS) -> Iterator:
    """The first ``n`` values of one column of the shards ``rels`` (fewer when they hold fewer), a row
    group at a time: a sample that costs a row group's column or so, whatever the split's size. A row
    group whose column is over ``max_chunk_bytes`` uncompressed (a foreign tool's one-group shard of
    large images) is passed over, unread; after ``max_groups`` row groups looked at, the sample is what
    it is."""
    left, groups = n, 0
    for rel in rels:
        if left <= 0 or groups >= max_groups:
            return
        with data.fs.open_input_file(data.path(rel)) as f:
            pf = pq.ParquetFile(f)
            for i in range(min(pf.num_row_groups, max_groups - groups)):
                if left <= 0:
                    return
                groups += 1
                group = pf.metadata.row_group(i)
                size = sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                           if group.column(j).path_in_schema == column)  # fmt: skip
                if size > max_chunk_bytes:
                    continue
                values = pf.read_row_group(i, columns=[column]).column(0).slice(0, left).to_pylist()
                left -= len(values)
                yield from values


def iter_examples(data: Storage, split: str, columns: list[str] | None = None) -> Iterator[dict]:
    """Rows of one split as dicts, one row group at a time (bounded memory)."""
    for rel in shard_paths(data, split):
        pf = data.parquet_file(rel)
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=columns).to_pylist()
