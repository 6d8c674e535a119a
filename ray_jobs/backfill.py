"""``danmul backfill``: tag an archive of images with Ray Data, resumably, results as Parquet.

    input (prefix of image files | manifest Parquet | Dan:mul dataset)
      -> skip posts already in OUT (resume)
      -> fetch + decode + preprocess        CPU tasks (bad images become error rows, never failures; a fetch
                                            failure that may pass is counted and left for the next run; each
                                            image decoded in a worker process within a CPU and memory budget).
                                            With GPU decoding (--gpu-decode, on by default where the predictors
                                            have GPUs): headers checked, JPEGs nvJPEG takes handed on as bytes
                                            with their plan (model.gpu_decode), the rest decoded here as before
                                            and handed on as 8-bit squares
      -> predict                            actor pool, Tagger loaded once per actor (a GPU each if any):
                                            only predicts, returning columns; with GPU decoding it decodes the
                                            bytes on its GPU first, several model batches per block so that
                                            decoding, copies and the model overlap with the CPU's share
      -> write                              tasks: one results file and one errors file per block,
                                            atomically, named by a hash of the block's post ids, and
                                            (optional) result hashes in Redis in the streaming tagger's
                                            format, so a platform reads both alike

Output, under OUT: ``results/part-*.parquet`` (``post_id``, ``characters`` and ``tags`` as lists of
``{name, score}``, ``abstained``, ``model``) and ``errors/part-*.parquet`` (``post_id``, ``image_uri``,
``reason``, ``detail``). A file is written whole or not at all (atomic rename / S3 PUT), so an
interrupted run leaves only complete files; the next run with the same OUT reads their post ids and
processes only the rest. An image whose fetch failed for a reason that may pass (storage or network
trouble: :class:`ingest.fetch.FetchRetry`) is in neither: it is counted (``retry``) and the same command,
run again, tries it again; a permanent failure (not found, forbidden, not an image...) is an error row,
written once. Streaming execution throughout: nothing collects the dataset on the driver;
the driver sees one small summary row per block (counts for the progress bar and the metrics).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

RESULTS, ERRORS = "results", "errors"
RESULT_SCHEMA = pa.schema([
    ("post_id", pa.int64()),
    ("characters", pa.list_(pa.struct([("name", pa.string()), ("score", pa.float32())]))),
    ("tags", pa.list_(pa.struct([("name", pa.string()), ("score", pa.float32())]))),
    ("abstained", pa.bool_()),
    ("model", pa.string()),
])  # fmt: skip
ERROR_SCHEMA = pa.schema([("post_id", pa.int64()), ("image_uri", pa.string()), ("reason", pa.string()),
                          ("detail", pa.string())])
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
FETCH_FAILED = "fetch_failed"  # the reason of a fetch that may pass: counted, never written to errors/
GPU_DECODE = ("auto", "on", "off")  # model.gpu_decode.SETTINGS (not imported here: the CLI imports this module)


@dataclass
class BackfillConfig:
    input: str = field(metadata={"help": "an image prefix (s3://archive/images/ or a folder), a manifest "
                                 "Parquet file or prefix (post_id, image_uri[, tags]), or a Dan:mul dataset"})
    checkpoint: str = field(metadata={"help": "model checkpoint folder or s3:// URI"})
    out: str = field(metadata={"help": "output URI; a re-run with the same OUT resumes"})
    kind: str = field(default="auto", metadata={"help": "input kind: auto, prefix, manifest or dataset"})
    split: str = field(default="test", metadata={"help": "split of a dataset input (all: every split)"})
    use_tags: bool = field(default=True, metadata={
        "help": "feed the tags of a manifest (tags column) or dataset to the model; off: image only"})
    batch_size: int | None = field(default=None, metadata={
        "help": "images per model batch (default: the preset's on GPU predictors, 256 for base; 64 on CPU)"})
    gpu_decode: str = field(default="auto", metadata={
        "help": "decode JPEGs on the predictors' device (nvJPEG on a GPU): auto (where the predictors have GPUs), "
                "on (also on CPU predictors, with torchvision's libjpeg), off (PIL in the decode tasks)"})
    in_flight: int = field(default=4, metadata={
        "help": "with GPU decoding, model batches per predictor call: the GPU decodes and runs the next while the "
                "CPU turns the last one's scores into rows"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model on GPU predictors (compiled once per actor before its first block)"})
    channels_last: bool = field(default=False, metadata={
        "help": "channels-last memory layout for the image encoder's convolution on GPU predictors"})
    actors: int = field(default=0, metadata={
        "help": "predictor actors (default: one per GPU; without GPUs one per CPU, less one for decoding; never "
                "more than the input has batches)"})
    decode_cpus: float = field(default=0.5, metadata={
        "help": "CPUs per decode task (not the predictors' share, so decoding runs in tasks of its own)"})
    buffer_mb: int = field(default=512, metadata={
        "help": "object-store memory the pipeline may hold between stages, MiB (bounds memory)"})
    limit: int = field(default=0, metadata={"help": "process at most this many images this run (0: all)"})
    top_k: int = field(default=5, metadata={"help": "characters kept per image"})
    redis: str | None = field(default=None, metadata={
        "help": "also write each result to this Redis as danmul:result:{post_id} (default: no)"})
    prefix: str = field(default="danmul:", metadata={"help": "Redis key prefix"})
    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (default: AWS_ENDPOINT_URL)"})
    fetch_timeout_s: float = field(default=10.0, metadata={  # ingest.fetch.FETCH_TIMEOUT_S
        "help": "one image fetch by URI that takes longer in all is given up, counted as failed for a reason that "
                "may pass (a re-run tries it again)"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster (default: start a local one)"})
    metrics_port: int = field(default=0, metadata={"help": "serve danmul_backfill_* metrics here (0: off)"})
    progress: bool = field(default=True, metadata={"help": "a progress bar with images/s and ETA on stderr"})

    def __post_init__(self) -> None:
        """Refuse sizes that could only fail later (a batch of none divides by zero), naming the flag (a
        ValueError the CLI prints), as ``ServeSettings`` does for the streaming tagger's."""
        for name, low in {"batch_size": 1, "actors": 0, "limit": 0, "in_flight": 1}.items():
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, not {getattr(self, name)}")
        if self.gpu_decode not in GPU_DECODE:
            raise ValueError(f"--gpu-decode must be one of {', '.join(GPU_DECODE)}, not {self.gpu_decode!r}")
        value = self.fetch_timeout_s
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ValueError(f"--fetch-timeout-s must be a positive number, not {value!r}")


# -- input ---------------------------------------------------------------------------------------------------
def detect_kind(storage) -> str:
    if storage.is_file("dataset.json"):
        return "dataset"
    if storage.uri.endswith(".parquet") or any(e.path.endswith(".parquet") for e in storage.list(recursive=False)):
        return "manifest"
    return "prefix"


def _file_row(uri: str) -> dict:
    """An input row for an image file of a prefix: post id from its name, fetched later by URI."""
    from ingest.schema import post_id_from_name

    post_id = post_id_from_name(uri)  # none: becomes a bad_post_id error row
    return {"post_id": -1 if post_id is None else post_id, "image_uri": uri, "image": None, "tags": None}


def _list_dir(row: dict, uri: str, endpoint_url: str | None) -> list[dict]:
    from ingest.storage import Storage

    base = Storage(uri, endpoint_url)
    sub = row["dir"]
    return [_file_row(base.uri_of(posixpath.join(sub, e.path))) for e in base.list(sub, suffixes=IMAGE_SUFFIXES)]


def read_input(cfg: BackfillConfig):
    """A Ray Dataset of ``post_id, image_uri, image, tags`` rows (image bytes inline for datasets)."""
    import ray.data

    from ingest.storage import Storage

    storage = Storage(cfg.input, cfg.endpoint_url)
    kind = detect_kind(storage) if cfg.kind == "auto" else cfg.kind
    if kind == "dataset":
        splits = ["train", "val", "test"] if cfg.split == "all" else [cfg.split]
        ds = ray.data.read_parquet([storage.path(s) for s in splits], filesystem=storage.fs,
                                   columns=["post_id", "image", "tags"])
        return ds.map_batches(_dataset_rows, batch_format="pyarrow", fn_kwargs={"use_tags": cfg.use_tags}), kind
    if kind == "manifest":
        ds = ray.data.read_parquet(storage.path(), filesystem=storage.fs)
        return ds.map_batches(_manifest_rows, batch_format="pyarrow", fn_kwargs={"use_tags": cfg.use_tags}), kind
    if kind != "prefix":
        raise ValueError(f"unknown input kind {kind!r} (auto, prefix, manifest or dataset)")
    # A large archive is a tree of folders (Danbooru's 512px/0000/...): list the top level here and
    # each folder in a Ray task, so listing millions of keys runs in parallel.
    top = storage.fs.get_file_info(pafs.FileSelector(storage.path(), recursive=False))
    dirs = [posixpath.basename(i.path) for i in top if i.type == pafs.FileType.Directory]
    files = [_file_row(storage.uri_of(posixpath.basename(i.path)))
             for i in top if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_SUFFIXES)]
    parts = []
    if dirs:
        parts.append(ray.data.from_items([{"dir": d} for d in dirs], override_num_blocks=min(len(dirs), 64))
                     .flat_map(_list_dir, fn_kwargs={"uri": storage.uri, "endpoint_url": cfg.endpoint_url}))
    if files:
        parts.append(ray.data.from_items(files))
    if not parts:
        raise ValueError(f"no image files under {storage.uri}")
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    # The listing (ids and URIs: tens of bytes a post) is kept, so its size is known for the ETA and
    # the archive is listed once.
    return ds.materialize(), kind


def _dataset_rows(batch: pa.Table, use_tags: bool) -> pa.Table:
    n = batch.num_rows
    tags = batch.column("tags") if use_tags else pa.nulls(n, pa.list_(pa.string()))
    return pa.table({"post_id": batch.column("post_id"), "image_uri": pa.nulls(n, pa.string()),
                     "image": batch.column("image"), "tags": tags})


def _manifest_rows(batch: pa.Table, use_tags: bool) -> pa.Table:
    missing = {"post_id", "image_uri"} - set(batch.column_names)
    if missing:
        raise ValueError(f"the manifest lacks column(s) {sorted(missing)}")
    n = batch.num_rows
    if use_tags and "tags" in batch.column_names:
        tags = batch.column("tags")
        if pa.types.is_string(tags.type) or pa.types.is_large_string(tags.type):  # "1girl solo" strings
            tags = pa.array([t.split() if t else None for t in tags.to_pylist()], pa.list_(pa.string()))
    else:
        tags = pa.nulls(n, pa.list_(pa.string()))
    return pa.table({"post_id": batch.column("post_id").cast(pa.int64()), "image_uri": batch.column("image_uri"),
                     "image": pa.nulls(n, pa.binary()), "tags": tags})


# -- resume --------------------------------------------------------------------------------------------------
def done_post_ids(out) -> np.ndarray:
    """Post ids already in OUT's results and errors (sorted). Files that cannot be read (not ours, or
    damaged by hand) are reported and ignored: their posts are processed again."""
    ids = []
    for sub in (RESULTS, ERRORS):
        for entry in out.list(sub, suffixes=(".parquet",)):
            try:
                ids.append(out.read_parquet(f"{sub}/{entry.path}", columns=["post_id"]).column("post_id").to_numpy())
            except Exception as e:  # any unreadable file is skipped, loudly
                print(f"danmul backfill: ignoring unreadable {out.uri_of(sub + '/' + entry.path)}: {e}",
                      file=sys.stderr)
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)


def _skip_done(batch: pa.Table, done_ref) -> pa.Table:
    import ray

    done = ray.get(done_ref) if not isinstance(done_ref, np.ndarray) else done_ref
    if not len(done):
        return batch
    ids = batch.column("post_id").to_numpy(zero_copy_only=False)
    return batch.filter(pa.array(~np.isin(ids, done)))


# -- decode (CPU tasks) ------------------------------------------------------------------------------------
def _missing(value) -> bool:
    """None in a numpy batch column may arrive as None or as NaN (a column that is all nulls)."""
    return value is None or isinstance(value, float | np.floating)


@functools.lru_cache(maxsize=4)
def _decoder(checkpoint: str, endpoint_url: str | None, fetch_timeout_s: float | None = None):
    """A decode worker for the checkpoint's preprocessing (one image at a time, within model.preprocess's
    CPU and memory budget per image, as the streaming tagger's) and a fetcher, made once per Ray worker
    process (Ray reuses workers across tasks): reading config.json, starting a decode process and opening
    object-storage clients per batch would repeat the work."""
    from ingest.fetch import FETCH_TIMEOUT_S, ImageFetcher
    from ingest.storage import Storage
    from model.checkpoint import read_config
    from model.decode_pool import DecodePool

    pool = DecodePool.for_config(read_config(Storage(checkpoint, endpoint_url)), workers=1)
    timeout_s = FETCH_TIMEOUT_S if fetch_timeout_s is None else fetch_timeout_s
    # the archive is the operator's own: any path
    return pool, ImageFetcher(["/"], endpoint_url=endpoint_url, timeout_s=timeout_s)


def decode_rows(batch: dict[str, np.ndarray], checkpoint: str, endpoint_url: str | None,
                fetch_timeout_s: float | None = None, device_decode: bool = False) -> dict[str, Any]:
    """Fetch and preprocess every row; failures become rows with ``reason`` set and no pixels. With
    ``device_decode`` the rows carry ``data`` and ``plan`` instead of ``pixels`` (see :func:`for_device`)."""
    from ingest.fetch import FetchRetry, store_of
    from ingest.queue import BAD_POST_ID, UNSUPPORTED_URI, BadUpload
    from model.preprocess import ImageError

    pool, fetcher = _decoder(checkpoint, endpoint_url, fetch_timeout_s)
    n = len(batch["post_id"])
    prepare = for_device(pool) if device_decode else None
    pixels = None if prepare else np.zeros((n, 3, pool.image_size, pool.image_size), dtype=np.float32)
    data, plans = [b""] * n, []
    reasons, details = [""] * n, [""] * n
    retry = np.zeros(n, dtype=bool)  # failed for a reason that may pass: not recorded, so a re-run tries again
    down: set[str] = set()  # stores that did not answer in this batch: the rest of their images wait too
    for i in range(n):
        try:
            if batch["post_id"][i] < 0:
                raise BadUpload(BAD_POST_ID, "no numeric post id in the file name")
            image = batch["image"][i]
            if _missing(image):
                uri = batch["image_uri"][i]
                if _missing(uri):
                    raise BadUpload(UNSUPPORTED_URI, "neither image bytes nor an image_uri")
                store = store_of(uri)
                if store in down:  # a second of client retries per image would only say it again
                    raise FetchRetry(f"{uri[:200]}: not tried, {store} did not answer earlier in this batch")
                image = fetcher.fetch(uri)
            if prepare:
                data[i], plan = prepare(bytes(image))
                plans.append((i, plan))
            else:
                pixels[i] = pool.preprocess(bytes(image))  # a decode over its budget is stopped: too_costly
        except (ImageError, BadUpload) as e:
            reasons[i], details[i] = e.reason, str(e)[:300]
        except FetchRetry as e:
            reasons[i], details[i], retry[i] = FETCH_FAILED, str(e)[:300], True
            if e.unreachable:
                down.add(e.unreachable)
    tags = ["" if _missing(t) else " ".join(t) for t in batch["tags"]]  # "": image only
    out = {"post_id": batch["post_id"],
           "image_uri": np.array(["" if _missing(u) else u for u in batch["image_uri"]], dtype=object),
           "tags": np.array(tags, dtype=object), "reason": np.array(reasons, dtype=object),
           "detail": np.array(details, dtype=object), "retry": retry}  # fmt: skip
    if prepare is None:
        return {**out, "pixels": pixels}
    from model.gpu_decode import PLAN_FIELDS

    plan_rows = np.zeros((n, PLAN_FIELDS), dtype=np.int32)
    for i, row in plans:
        plan_rows[i] = row
    return {**out, "data": np.array(data, dtype=object), "plan": plan_rows}


def for_device(pool):
    """The decode step of GPU decoding, for one image: its header checked (the CPU path's checks and reasons,
    nothing decoded) and then either ``(the JPEG's bytes, its plan)`` for the predictor's device, or, for an
    image only the CPU path decodes, ``(its 8-bit RGB square's bytes, zeros)`` decoded here within the pool's
    budget as before (a quarter of the float pixels' bytes; the predictor normalises it)."""
    from model.gpu_decode import plan, plan_row, to_uint8

    mean, std = pool.config["mean"], pool.config["std"]

    def prepare(image: bytes) -> tuple[bytes, np.ndarray]:
        p = plan(image, pool.image_size)
        if p is not None:
            return image, plan_row(p)
        return to_uint8(pool.preprocess(image), mean, std).tobytes(), plan_row(None)

    return prepare


# -- predict (actor pool) -------------------------------------------------------------------------------------
PREDICTION_SCHEMA = pa.schema([
    ("post_id", pa.int64()), ("image_uri", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("retry", pa.bool_()), *[RESULT_SCHEMA.field(n) for n in ("characters", "tags", "abstained", "model")],
])  # fmt: skip


class Predictor:
    """Loads the ``Tagger`` once per actor; each call predicts a block and returns it as columns: the
    prediction for every row that decoded, the failure (reason, and whether it may pass) for the others.
    Writing is the next step's (:func:`write_block`). A block from GPU decoding (``data`` and ``plan``
    columns) is decoded here first, on the model's device (:class:`model.gpu_decode.BatchDecoder`; an image
    the device refuses is decoded on the CPU within the decode budget)."""

    def __init__(self, checkpoint: str, endpoint_url: str | None, top_k: int, batch_size: int | None = None,
                 compile: bool = False, channels_last: bool = False):
        import torch

        from ingest.storage import Storage
        from model.gpu_decode import BatchDecoder
        from model.tagger import Tagger

        self.tagger = Tagger.from_checkpoint(Storage(checkpoint, endpoint_url), batch_size=batch_size,
                                             compile=compile, channels_last=channels_last)
        if self.tagger.device.type == "cpu":
            torch.set_num_threads(1)  # one core per predictor actor (see run)
        self.top_k = top_k
        self._pool = None
        self.decoder = BatchDecoder.for_config(self.tagger.config, self.tagger.device, fallback=self._fallback)
        if compile:
            self.tagger.warm_up()

    def _fallback(self, data: bytes) -> np.ndarray:
        """The CPU path for an image the device refused (rare: a damaged JPEG): in a worker process, within the
        decode budget, started when first needed."""
        if self._pool is None:
            from model.decode_pool import DecodePool

            self._pool = DecodePool.for_config(self.tagger.config, workers=1)
        return self._pool.preprocess(data)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        reason, detail = np.array(batch["reason"], dtype=object), np.array(batch["detail"], dtype=object)
        n = len(reason)
        characters: list = [None] * n
        tags: list = [None] * n
        abstained: list = [None] * n
        model: list = [None] * n
        given = [t.split() or None for t in batch["tags"]]
        for rows, scores in _one_ahead(self._scores(batch, reason, detail, given)):
            preds = self.tagger.predictions(0, scores, [given[i] for i in rows], top_k=self.top_k)
            for i, p in zip(rows, preds, strict=True):
                characters[i] = [{"name": c, "score": s} for c, s in p.characters]
                tags[i] = [{"name": t, "score": s} for t, s in p.tags.items()]
                abstained[i], model[i] = p.abstained, p.model
        ok = np.array([r == "" for r in reason], dtype=bool)
        return pa.table({
            "post_id": batch["post_id"].astype(np.int64), "image_uri": list(batch["image_uri"]),
            "reason": list(reason), "detail": list(detail),
            "retry": batch["retry"].astype(bool) & ~ok, "characters": characters, "tags": tags,
            "abstained": abstained, "model": model,
        }, schema=PREDICTION_SCHEMA)  # fmt: skip

    def _scores(self, batch: dict[str, np.ndarray], reason: np.ndarray, detail: np.ndarray, given: list):
        """``(rows, pending scores)`` per model batch, one batch ahead: the next is decoded and queued on the
        device before the caller turns the last one into rows. A row the device decode refuses gets its reason."""
        import torch

        todo = np.nonzero(np.array([r == "" for r in reason], dtype=bool))[0]
        size = self.tagger.batch_size
        for start in range(0, len(todo), size):
            rows = todo[start : start + size]
            if "pixels" in batch:  # decoded by the decode tasks
                contiguous = rows[-1] - rows[0] + 1 == len(rows)  # the usual case: a view, not a copy of the floats
                pixels = batch["pixels"][rows[0] : rows[-1] + 1] if contiguous else batch["pixels"][rows]
                yield rows, self.tagger.scores_async(torch.from_numpy(pixels), [given[i] for i in rows])
                continue
            out = self.decoder(*_device_items(batch, rows, self.tagger.config.image_size))
            for i, e in zip(rows, out.errors, strict=True):
                if e is not None:
                    reason[i], detail[i] = e.reason, str(e)[:300]
            good = out.ok
            if good.all():  # the usual case: no boolean mask, whose indexing would wait for the GPU
                yield rows, self.tagger.scores_async(out.pixels, [given[i] for i in rows])
            elif good.any():
                rows, kept = rows[good], torch.from_numpy(np.nonzero(good)[0]).to(out.pixels.device)
                yield rows, self.tagger.scores_async(out.pixels[kept], [given[i] for i in rows])

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.close()


def _one_ahead(items):
    """``items``, each handed on only once the next one has been made: making one queues a model batch on the
    device, so the GPU runs it while the caller works on the one before."""
    it = iter(items)
    last = next(it, None)
    if last is None:
        return
    for item in it:
        yield last
        last = item
    yield last


def _device_items(batch: dict[str, np.ndarray], rows: np.ndarray, size: int) -> tuple[list, list]:
    """A GPU-decoding block's rows -> the batch decoder's images (JPEG bytes, or the 8-bit squares the decode
    tasks made) and plans."""
    from model.gpu_decode import plan_of_row

    plans = [plan_of_row(batch["plan"][i]) for i in rows]
    images = [bytes(batch["data"][i]) if p is not None
              else np.frombuffer(batch["data"][i], dtype=np.uint8).reshape(size, size, 3)
              for i, p in zip(rows, plans, strict=True)]
    return images, plans


# -- write (tasks) ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _writer(out: str, endpoint_url: str | None, redis_url: str | None, prefix: str):
    """The output storage and, if asked for, a Redis client: made once per worker process."""
    from ingest.storage import Storage

    client = None
    if redis_url:
        from ingest.queue import connect

        client = connect(redis_url)
    return Storage(out, endpoint_url), client


class BlockWriter:
    """The write step as a small actor pool (tasks per block cost the pipeline more than the writes)."""

    def __init__(self, out: str, endpoint_url: str | None, redis_url: str | None, prefix: str):
        self.kwargs = dict(out=out, endpoint_url=endpoint_url, redis_url=redis_url, prefix=prefix)

    def __call__(self, block: pa.Table) -> dict[str, np.ndarray]:
        return write_block(block, **self.kwargs)


def write_block(block: pa.Table, out: str, endpoint_url: str | None, redis_url: str | None,
                prefix: str) -> dict[str, np.ndarray]:
    """One block's results file and errors file, each written whole (named by a hash of the block's post ids,
    so a retried block overwrites its own files), and its results in Redis if asked for; returns the block's
    counts for the driver. A failure that may pass is recorded nowhere: a re-run tries it again."""
    from ingest.queue import Keys, result_fields

    t0 = time.perf_counter()
    storage, client = _writer(out, endpoint_url, redis_url, prefix)
    reason = block.column("reason").to_pylist()
    retry = block.column("retry").to_numpy(zero_copy_only=False)
    ok = np.array([r == "" for r in reason], dtype=bool)
    failed = ~ok & ~retry  # permanent: recorded once as errors
    ids = block.column("post_id").to_numpy()
    name = hashlib.sha1(ids.tobytes()).hexdigest()[:20]
    results = block.filter(pa.array(ok)).select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
    if results.num_rows:
        storage.write_parquet(f"{RESULTS}/part-{name}.parquet", results)
    if failed.any():
        errors = block.filter(pa.array(failed)).select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA)
        storage.write_parquet(f"{ERRORS}/part-{name}.parquet", errors)
    if client is not None and results.num_rows:
        keys, pipe = Keys(prefix), client.pipeline(transaction=False)
        for row in results.to_pylist():
            prediction = {"characters": [[c["name"], c["score"]] for c in row["characters"]],
                          "tags": {t["name"]: t["score"] for t in row["tags"]}, "model": row["model"],
                          "abstained": row["abstained"]}  # fmt: skip
            pipe.hset(keys.result(row["post_id"]), mapping=result_fields(prediction))
        pipe.execute()
    return {"ok": np.array([int(ok.sum())]), "errors": np.array([int(failed.sum())]),
            "retry": np.array([int(retry.sum())]), "seconds": np.array([time.perf_counter() - t0])}


# -- the job ---------------------------------------------------------------------------------------------
@dataclass
class BackfillResult:
    processed: int
    errors: int
    skipped: int
    seconds: float
    images_per_s: float
    retry: int = 0  # fetches that failed for reasons that may pass: in neither results nor errors, left for a re-run


def cpu_shortfall(actors: int, cpus_per_actor: float, decode_cpus: float, cluster_cpus: float) -> str | None:
    """Why the job would wait for a bigger cluster, or None: predictors that hold every CPU leave none for
    the decode tasks, and Ray Data waits (for an autoscaler to add nodes, or forever) with nothing to show."""
    needed = actors * cpus_per_actor + decode_cpus
    if needed <= cluster_cpus:
        return None
    return (f"warning: {actors} predictor(s) of {cpus_per_actor:g} CPU and decode tasks of {decode_cpus:g} CPU need "
            f"{needed:g} CPUs; the cluster has {cluster_cpus:g}: the job waits until it grows. Give fewer --actors "
            f"(at most {max(0, math.floor((cluster_cpus - decode_cpus) / cpus_per_actor)) if cpus_per_actor else 0}) "
            "or a smaller --decode-cpus")


def model_batch(cfg: BackfillConfig, gpus: int) -> tuple[int, bool]:
    """The model batch (``--batch-size``, else the checkpoint preset's for the predictors' device) and whether
    JPEGs are decoded on the predictors' device (``--gpu-decode``: auto is on where the predictors have GPUs)."""
    from ingest.storage import Storage
    from model.checkpoint import read_config
    from model.config import default_batch_size
    from model.gpu_decode import GPU, decode_path

    device = "cuda" if gpus else "cpu"
    batch = cfg.batch_size or default_batch_size(read_config(Storage(cfg.checkpoint, cfg.endpoint_url)), device)
    return batch, decode_path(device, cfg.gpu_decode, probe=False) == GPU  # the GPUs are the actors', not ours


def run(cfg: BackfillConfig, log=print) -> BackfillResult:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from ingest.storage import Storage
    from ray_jobs.config import dump
    from ray_jobs.local_ray import ensure_ray

    out = Storage(cfg.out, cfg.endpoint_url)
    # A local Ray without GPUs: one single-threaded predictor per core (per core-second that is more
    # images than one predictor with every core: a tiny model's ops are too small to split well) plus a
    # logical CPU for the decode tasks; the OS shares the cores among them.
    ensure_ray(cfg.address, (cfg.actors or os.cpu_count() or 1) + 1)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = cfg.actors or (gpus if gpus else max(1, int(resources.get("CPU", 2)) - 1))
    # Bound what waits between the stages (decoded images are the bulk: 3 x S x S floats each): Ray Data
    # stops feeding a stage whose outputs would pass this, so memory stays flat however big the archive.
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=cfg.buffer_mb * 2**20)
    ds, kind = read_input(cfg)
    total = ds.count()  # Parquet metadata for manifests and datasets; the kept listing for a prefix
    batch, device_decode = model_batch(cfg, gpus)
    block = batch * (cfg.in_flight if device_decode and gpus else 1)  # rows per decode task and predictor call
    # no more predictors than batches: each loads the model (seconds of CPU) before its first image
    actors = min(actors, max(1, math.ceil(min(total, cfg.limit or total) / block)))
    warning = cpu_shortfall(actors, 0 if gpus else 1, cfg.decode_cpus, resources.get("CPU", 0))
    if warning:
        log(warning)
    done = done_post_ids(out)
    if len(done):
        log(f"resuming: {len(done):,} posts already in {out.uri} are skipped")
        ds = ds.map_batches(_skip_done, batch_format="pyarrow", fn_kwargs={"done_ref": ray.put(done)})
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    ds = ds.map_batches(decode_rows, batch_size=block, batch_format="numpy", num_cpus=cfg.decode_cpus,
                        fn_kwargs={"checkpoint": cfg.checkpoint, "endpoint_url": cfg.endpoint_url,
                                   "fetch_timeout_s": cfg.fetch_timeout_s, "device_decode": device_decode})
    ds = ds.map_batches(
        Predictor, batch_size=block, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        fn_constructor_kwargs=dict(checkpoint=cfg.checkpoint, endpoint_url=cfg.endpoint_url, top_k=cfg.top_k,
                                   batch_size=batch, compile=cfg.compile, channels_last=cfg.channels_last),
    )  # fmt: skip
    ds = ds.map_batches(BlockWriter, batch_size=None, batch_format="pyarrow", num_cpus=0,
                        compute=ActorPoolStrategy(size=1), fn_constructor_kwargs=dict(
                            out=cfg.out, endpoint_url=cfg.endpoint_url, redis_url=cfg.redis, prefix=cfg.prefix))
    metrics = _metrics(cfg.metrics_port)
    log(f"backfill of {total:,} images in {cfg.input} ({kind}) -> {out.uri} with {actors} predictor(s)"
        f"{' on GPUs' if gpus else ' on CPU'}, batch {batch}, JPEGs decoded "
        f"{('on the GPUs' if gpus else 'by the predictors') if device_decode else 'by CPU tasks'}")
    todo = max(0, total - len(done))
    bar = _progress(cfg.progress, min(todo, cfg.limit) if cfg.limit else todo)
    processed = errors = retry = 0
    t0 = time.perf_counter()
    for summary in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ok, bad, again = int(summary["ok"].sum()), int(summary["errors"].sum()), int(summary["retry"].sum())
        processed, errors, retry = processed + ok, errors + bad, retry + again
        if metrics:
            metrics["images"].labels("tagged").inc(ok)
            metrics["images"].labels("error").inc(bad)
            metrics["images"].labels("retry").inc(again)
            metrics["rate"].set((processed + errors + retry) / (time.perf_counter() - t0))
        if bar is not None:
            bar.update(ok + bad + again)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    rate = (processed + errors + retry) / seconds if seconds else 0.0
    out.write_text("backfill.yaml", dump(cfg))
    log(f"{processed:,} images tagged, {errors:,} errors, {len(done):,} skipped (done before) in {seconds:.1f} s: "
        f"{rate:,.0f} images/s")
    if retry:
        log(f"{retry:,} images failed for reasons that may pass: run the same command again to retry them")
    return BackfillResult(processed, errors, len(done), seconds, rate, retry)


def _progress(enabled: bool, total: int):
    """images/s and ETA; ``total`` counts the input less what was done before (an estimate when the
    input has posts the output holds that are no longer in it)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="backfill", file=sys.stderr, smoothing=0.1, mininterval=1.0)


def _metrics(port: int) -> dict | None:
    if not port:
        return None
    from dashboards import metrics

    metrics.serve_node_metrics(port)
    return {"images": metrics.BACKFILL_IMAGES, "rate": metrics.BACKFILL_RATE}


def read_results(out: str, endpoint_url: str | None = None) -> tuple[pa.Table, pa.Table]:
    """All results and errors of an OUT (for tests, checks and small outputs)."""
    from ingest.storage import Storage

    storage = Storage(out, endpoint_url)
    tables = {}
    for sub, schema in ((RESULTS, RESULT_SCHEMA), (ERRORS, ERROR_SCHEMA)):
        parts = [storage.read_parquet(f"{sub}/{e.path}") for e in storage.list(sub, suffixes=(".parquet",))]
        tables[sub] = pa.concat_tables(parts) if parts else schema.empty_table()
    return tables[RESULTS], tables[ERRORS]
