"""Build Dan:mul from Danbooru2021 metadata and its 512px image tree (``danmul data build``).

The paper's construction, each step counted:
  1. keep posts whose 512px image exists;
  2. keep posts with exactly one character tag;
  3. drop characters with fewer than ``min_images`` posts;
  4. tag importance filtering: general tags in at least ``min_tag_count`` posts, at most ``max_tags``
     of the most frequent; character/artist/meta tags leave the tag list, copyright tags get a column;
  5. split train/val/test per character, deterministic for a seed.
Before step 1 the hygiene the real dumps need: malformed lines (counted, with line numbers), deleted
and banned posts, duplicate ids.

The metadata is streamed three times (count characters; count tags of the kept posts; write), so
memory depends on the number of images in the tree and the vocabulary, never on the number of lines.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.danbooru import BadPost, Post, image_relpath, parse_line
from ingest.schema import DatasetInfo, FilterStep
from ingest.shards import DEFAULT_SHARD_MB, DatasetWriter, Example, SplitAssigner, parse_fractions
from ingest.storage import NotFound, Storage, StorageError, TooLarge

T = TypeVar("T")
R = TypeVar("R")
METADATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".json.zst", ".jsonl.zst")
MAX_EXAMPLES = 20  # malformed lines reported by file and line number, per build
IMAGE_MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
}


@dataclass
class BuildConfig:
    metadata: str = field(metadata={"help": "metadata JSONL file, or a folder/prefix of posts*.json files"})
    images: str = field(metadata={"help": "root of the 512px image tree ({id % 1000:04d}/{id}.jpg)"})
    out: str = field(metadata={"help": "output dataset URI (local folder or s3://bucket/prefix)"})
    min_images: int = field(default=10, metadata={"help": "drop characters with fewer posts than this"})
    min_tag_count: int = field(default=5, metadata={
        "help": "keep general tags in at least this many posts (half the smallest class: a tag naming a detail of "
                "the rarest character survives; --max-tags bounds the vocabulary at scale)"})
    max_tags: int = field(default=10000, metadata={"help": "keep at most this many general tags (0: no cap)"})
    splits: str = field(default="0.8,0.1,0.1", metadata={"help": "train,val,test fractions per character"})
    seed: int = field(default=0, metadata={"help": "seed of the train/val/test split"})
    shard_mb: float = field(default=DEFAULT_SHARD_MB, metadata={"help": "image bytes per shard file, MiB"})
    image_ext: str = field(default="jpg", metadata={"help": "extension of files in the image tree"})
    max_image_mb: float = field(default=20.0, metadata={"help": "skip image files larger than this, MiB"})
    io_threads: int = field(default=16, metadata={"help": "parallel image reads (matters on S3)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing dataset at --out"})
    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (else AWS_ENDPOINT_URL)"})


@dataclass
class BuildResult:
    info: DatasetInfo
    lines: int
    seconds: float


class ImageIndex:
    """The post ids that have an image. One byte per id up to the largest (Danbooru2021: about 5 MB),
    indexed directly: bit 0 = image present, bit 1 = already seen in the metadata (duplicates).
    Ids so sparse that the bytes would be wasteful fall back to sets."""

    HAS, SEEN = 1, 2
    DENSE_OVERHEAD = 64  # bytes per image we accept for the direct table before using sets

    def __init__(self, ids: np.ndarray):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        self.count = int(ids.size)
        top = int(ids[-1]) + 1 if ids.size else 0
        self._flags: bytearray | None = None
        self._ids: set[int] = set()
        self._seen: set[int] = set()
        if top <= self.DENSE_OVERHEAD * self.count + (16 << 20):
            flags = np.zeros(top, dtype=np.uint8)
            flags[ids] = self.HAS
            self._flags = bytearray(flags.tobytes())
        else:
            self._ids = set(ids.tolist())

    @classmethod
    def scan(cls, images: Storage, ext: str, progress: bool = False) -> ImageIndex:
        """List the 1,000 bucket folders one at a time, so no listing holds the whole tree."""
        suffix = f".{ext}"
        chunks = []
        buckets = range(1000)
        if progress:
            from tqdm import tqdm

            buckets = tqdm(buckets, desc="index images", unit="dir", file=sys.stderr)
        for bucket in buckets:
            names = [e.path for e in images.list(f"{bucket:04d}", recursive=False, suffixes=(suffix,))]
            stems = [n[: -len(suffix)] for n in names]
            chunks.append(np.array([int(s) for s in stems if s.isdigit()], dtype=np.int64))
        return cls(np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return self.count

    def has(self, post_id: int) -> bool:
        if self._flags is not None:
            return post_id < len(self._flags) and bool(self._flags[post_id] & self.HAS)
        return post_id in self._ids

    def first_sighting(self, post_id: int) -> bool:
        """True the first time an id with an image is seen."""
        if self._flags is not None:
            if post_id >= len(self._flags) or self._flags[post_id] != self.HAS:
                return False
            self._flags[post_id] |= self.SEEN
            return True
        if post_id not in self._ids or post_id in self._seen:
            return False
        self._seen.add(post_id)
        return True


_SPILL_SCHEMA = pa.schema([
    ("post_id", pa.int64()), ("character", pa.string()), ("general", pa.list_(pa.string())),
    ("copyright", pa.list_(pa.string())), ("rating", pa.string()),
])  # fmt: skip
_SPILL_BATCH = 8192


class _Spill:
    """The posts that pass steps 1-2, kept compactly in a local Parquet file so the later passes
    read them back in batches instead of parsing the JSON again."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, "candidates.parquet")
        self._writer = pq.ParquetWriter(self.path, _SPILL_SCHEMA, compression="lz4")
        self._rows: list[Post] = []
        self.count = 0

    def add(self, post: Post) -> None:
        self._rows.append(post)
        self.count += 1
        if len(self._rows) >= _SPILL_BATCH:
            self._flush()

    def _flush(self) -> None:
        rows, self._rows = self._rows, []
        if rows:
            self._writer.write_table(pa.table({
                "post_id": [p.post_id for p in rows], "character": [p.characters[0] for p in rows],
                "general": [p.general for p in rows], "copyright": [p.copyright for p in rows],
                "rating": [p.rating for p in rows],
            }, schema=_SPILL_SCHEMA))  # fmt: skip

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __iter__(self) -> Iterator[dict]:
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=_SPILL_BATCH):
            yield from batch.to_pylist()


class _Tally:
    """Counts what each step removed during the first pass."""

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []

    def bad(self, where: str, reason: str) -> None:
        self.reasons[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where} {reason}")


def metadata_files(meta: Storage) -> list[str]:
    """The metadata URI is one file, or a folder/prefix whose JSON Lines files are read in name order."""
    if meta.is_file():
        return [""]
    files = [e.path for e in meta.list(suffixes=METADATA_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"no metadata files ({', '.join(METADATA_SUFFIXES)}) under {meta.uri}")
    return files


def iter_lines(meta: Storage, files: list[str]) -> Iterator[tuple[str, int, bytes]]:
    for rel in files:
        name = rel or meta.uri.rsplit("/", 1)[-1]
        for lineno, line in enumerate(meta.open_lines(rel), start=1):
            if line.strip():
                yield name, lineno, line


def _candidates(
    meta: Storage,
    files: list[str],
    index: ImageIndex,
    tally: _Tally,
    progress: Callable[[int], None],
) -> Iterator[Post]:
    """Posts that pass the hygiene checks and steps 1-2, in input order; ``tally`` records why the
    others were dropped."""
    for name, lineno, line in iter_lines(meta, files):
        progress(1)
        try:
            post = parse_line(line)
        except BadPost as e:
            tally.bad(f"{name}:{lineno}", e.reason)
            continue
        if post.deleted or post.banned:
            tally.bad(f"{name}:{lineno}", "deleted" if post.deleted else "banned")
            continue
        if not index.has(post.post_id):
            tally.bad(f"{name}:{lineno}", "missing_image")
            continue
        if not index.first_sighting(post.post_id):
            tally.bad(f"{name}:{lineno}", "duplicate_id")
            continue
        if len(post.characters) != 1:
            tally.bad(f"{name}:{lineno}", "no_character" if not post.characters else "multiple_characters")
            continue
        yield post


def sniff_image(data: bytes) -> str | None:
    """The container format from the first bytes, or None if this is not an image we store."""
    for magic, fmt in IMAGE_MAGIC.items():
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def build(cfg: BuildConfig, progress: bool | None = None, log: Callable[[str], None] = print) -> BuildResult:
    """Run the whole construction and write the dataset. Returns its ``dataset.json`` contents."""
    if progress is None:
        progress = sys.stderr.isatty()
    fractions = parse_fractions(cfg.splits)
    t0 = time.perf_counter()
    meta = Storage(cfg.metadata, cfg.endpoint_url)
    images = Storage(cfg.images, cfg.endpoint_url)
    out = Storage(cfg.out, cfg.endpoint_url)
    files = metadata_files(meta)
    if not images.exists():
        raise FileNotFoundError(f"image tree {images.uri} does not exist")
    # refuse an existing dataset now, not after the long passes
    writer = DatasetWriter(out, source="danbooru", shard_mb=cfg.shard_mb, overwrite=cfg.overwrite)

    log(f"indexing images under {images.uri}")
    index = ImageIndex.scan(images, cfg.image_ext, progress=progress)
    log(f"{len(index):,} images found; pass 1/3: parse metadata")

    with tempfile.TemporaryDirectory(prefix="danmul-build-") as tmp:
        # Pass 1: parse every line once; hygiene, steps 1-2, posts per character; spill the survivors.
        tally = _Tally()
        char_counts: Counter[str] = Counter()
        spill = _Spill(tmp)
        with _bar(progress, "pass 1/3", None, "lines") as bar:
            for post in _candidates(meta, files, index, tally, bar.update):
                char_counts[post.characters[0]] += 1
                spill.add(post)
            lines = bar.n
        spill.close()
        del index  # its memory is no longer needed

        # Step 3: characters with enough images.
        kept_chars = {c: n for c, n in char_counts.items() if n >= cfg.min_images}
        rare_posts = sum(n for c, n in char_counts.items() if c not in kept_chars)

        # Pass 2: general-tag frequencies over the posts that survive step 3.
        log(f"{len(kept_chars):,} characters kept; pass 2/3: tags")
        tag_counts: Counter[str] = Counter()
        with _bar(progress, "pass 2/3", spill.count, "posts") as bar:
            for row in spill:
                bar.update(1)
                if row["character"] in kept_chars:
                    tag_counts.update(row["general"])
        vocab = _select_tags(tag_counts, cfg.min_tag_count, cfg.max_tags)
        vocab_set = set(vocab)
        removed_occurrences = sum(n for t, n in tag_counts.items() if t not in vocab_set)

        # Pass 3: filter tags, assign splits, read images, write shards.
        log(f"{len(vocab):,} general tags kept; pass 3/3: write shards to {out.uri}")
        assigner = SplitAssigner(kept_chars, fractions, cfg.seed)
        read_failures: Counter[str] = Counter()
        max_bytes = int(cfg.max_image_mb * (1 << 20))

        def fetch(post_id: int) -> bytes | str:
            try:
                data = images.read_bytes(image_relpath(post_id, cfg.image_ext), max_bytes=max_bytes)
            except NotFound:
                return "image_vanished"
            except TooLarge:
                return "image_too_large"
            except StorageError:
                return "image_read_error"
            return data if sniff_image(data) else "not_an_image"

        def emit(row: dict, data: bytes | str) -> None:
            if isinstance(data, str):
                read_failures[data] += 1
                return
            ex = Example(
                post_id=row["post_id"],
                image=data,
                character=row["character"],
                tags=[t for t in row["general"] if t in vocab_set],
                copyright=row["copyright"],
                rating=row["rating"],
            )
            writer.add(ex, assigner.assign(ex.character, ex.post_id))

        def wanted() -> Iterator[dict]:
            with _bar(progress, "pass 3/3", spill.count, "posts") as bar:
                for row in spill:
                    bar.update(1)
                    if row["character"] in kept_chars:
                        yield row

        # Local files read fastest in line; object stores need many requests in flight.
        threads = 1 if images.local else max(1, cfg.io_threads)
        for row, data in ordered_map(lambda row: fetch(row["post_id"]), wanted(), threads):
            emit(row, data)

    r = tally.reasons
    parse_reasons = ("malformed_json", "not_an_object", "no_id", "bad_id", "bad_tags", "no_tag_categories")
    filters = [
        FilterStep(
            "parse",
            "lines that are not usable posts",
            removed_posts=sum(r[k] for k in parse_reasons),
            detail={k: r[k] for k in parse_reasons if r[k]},
            examples=tally.examples,
        ),
        FilterStep(
            "deleted_banned",
            "deleted or banned posts",
            removed_posts=r["deleted"] + r["banned"],
            detail={k: r[k] for k in ("deleted", "banned") if r[k]},
        ),
        FilterStep("image_exists", "posts without a 512px image", removed_posts=r["missing_image"]),
        FilterStep("duplicate_id", "repeated post ids (first kept)", removed_posts=r["duplicate_id"]),
        FilterStep(
            "one_character",
            "posts without exactly one character tag",
            removed_posts=r["no_character"] + r["multiple_characters"],
            detail={k: r[k] for k in ("no_character", "multiple_characters") if r[k]},
        ),
        FilterStep(
            "min_images",
            f"characters with fewer than {cfg.min_images} posts",
            removed_posts=rare_posts,
            removed_classes=len(char_counts) - len(kept_chars),
        ),
        FilterStep(
            "tag_importance",
            f"general tags in fewer than {cfg.min_tag_count} posts or beyond the top {cfg.max_tags or 'all'}"
            "; character/artist/meta tags leave the tag list",
            detail={
                "tags_before": len(tag_counts),
                "tags_removed": len(tag_counts) - len(vocab),
                "occurrences_removed": removed_occurrences,
            },
        ),
        FilterStep(
            "image_read",
            "kept posts whose image could not be stored",
            removed_posts=sum(read_failures.values()),
            detail=dict(read_failures),
        ),
    ]
    info = writer.close(filters=filters, config=asdict(cfg) | {"lines": lines}, tag_vocab=vocab)
    return BuildResult(info=info, lines=lines, seconds=time.perf_counter() - t0)


def _select_tags(counts: Counter[str], min_count: int, max_tags: int) -> list[str]:
    """Most frequent first (ties by name), at least ``min_count`` posts, at most ``max_tags`` (0: all)."""
    ranked = sorted(((t, n) for t, n in counts.items() if n >= min_count), key=lambda kv: (-kv[1], kv[0]))
    if max_tags > 0:
        ranked = ranked[:max_tags]
    return [t for t, _ in ranked]


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, with at most ``4 * threads`` calls in flight."""
    if threads <= 1:
        for item in items:
            yield item, fn(item)
        return
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(threads) as pool:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 4 * threads:
                first, fut = pending.popleft()
                yield first, fut.result()
        while pending:
            first, fut = pending.popleft()
            yield first, fut.result()


class _bar:
    """A tqdm bar when ``enabled``, else a plain counter with the same ``update``/``n``."""

    def __init__(self, enabled: bool, desc: str, total: int | None, unit: str):
        self.enabled, self.desc, self.total, self.unit = enabled, desc, total, unit
        self.n = 0
        self._tqdm = None

    def __enter__(self) -> _bar:
        if self.enabled:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc=self.desc, unit=f" {self.unit}", file=sys.stderr, mininterval=1)
        return self

    def update(self, k: int) -> None:
        self.n += k
        if self._tqdm is not None:
            self._tqdm.update(k)

    def __exit__(self, *exc) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
