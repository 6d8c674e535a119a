"""``danmul serve`` and ``danmul enqueue``: the streaming tagger's front ends.

``serve`` starts (or joins, ``--address``) a Ray cluster, deploys ``deploy.app`` and keeps it running
until SIGINT/SIGTERM, then stops it gracefully: consumers finish what they hold or leave it pending.
``enqueue`` puts uploads on the stream from image files, object-storage URIs or a Dan:mul split; it
needs no Ray.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from deploy.settings import ServeSettings
from ray_jobs.local_ray import ensure_ray, logs_folder, verbose


def latencies_s(results: list) -> list[float]:
    """End-to-end seconds of each ``results`` stream entry: its Redis timestamp minus its upload's."""
    from ingest.queue import entry_ms

    return [(entry_ms(eid) - entry_ms(fields[b"upload_id"])) / 1000 for eid, fields in results]


def cpus_needed(s: ServeSettings) -> float:
    return s.max_replicas * s.replica_cpus + s.consumers * 0.25 + 0.1


def serve_forever(s: ServeSettings, log=print, stop: threading.Event | None = None) -> None:
    import ray
    from ray import serve

    from deploy.app import deploy, undeploy
    from ingest.queue import redact

    check_redis(s, log)
    if s.api_keys_file:  # a keys file that cannot be used stops the start here, naming the file
        from deploy.http import load_api_keys

        load_api_keys(s.api_keys_file)
    ensure_ray(s.address, cpus_needed(s))
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        t0 = time.perf_counter()
        deploy(s)
        log(f"danmul streaming tagger ready in {time.perf_counter() - t0:.1f} s: uploads from "
            f"{redact(s.redis)} stream {s.prefix}uploads (group {s.group}), {s.consumers} consumer(s), "
            f"{s.min_replicas}-{s.max_replicas} model replica(s)")
        log(f"  HTTP API  http://{s.http_host}:{s.http_port}/  (POST /evaluate, POST /v1/tag, GET /health)")
        if s.metrics_port:
            log(f"  metrics   http://127.0.0.1:{s.metrics_port}/metrics  (each node serves its own)")
        if not s.address and not verbose():
            log(f"  replica logs: {logs_folder()}/serve/  (danmul --verbose serve ... shows them here)")
        log("  stop with Ctrl-C (uploads in flight finish or stay pending for another consumer)")
        stop.wait()
        log("stopping: consumers drain their in-flight uploads ...")
        undeploy()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not s.address:
            serve.shutdown()
            ray.shutdown()
    log("stopped")


def check_redis(s: ServeSettings, log=print) -> None:
    """Before anything starts: refuse a Redis the tagger cannot keep its promise on (wrong credentials, an
    evicting policy, too old, a cluster prefix without a hash tag) with a clear message
    (``ingest.queue.RedisSetupError``, a ValueError the CLI prints); an unreachable Redis is only a warning
    (the consumers wait for it)."""
    from redis.exceptions import ConnectionError, TimeoutError

    from ingest.queue import Keys, check_server, connect, redact

    client = connect(s.redis, ca_file=s.redis_ca_file, cluster=s.redis_cluster, retries=0)
    try:
        for warning in check_server(client, Keys(s.prefix), s.allow_eviction, s.redis_cluster, s.group,
                                    s.allow_other_groups):
            log(f"warning: {warning}")
    except (ConnectionError, TimeoutError, OSError) as e:
        log(f"warning: Redis at {redact(s.redis)} is not reachable yet ({type(e).__name__}: {e}); the consumers "
            "will wait for it")
    finally:
        client.close()


# -- enqueue -----------------------------------------------------------------------------------------------
@dataclass
class EnqueueSettings:
    redis: str = field(default="redis://127.0.0.1:6379/0", metadata={"help": "Redis URL"})
    prefix: str = field(default="danmul:", metadata={"help": "key prefix"})
    data: str | None = field(default=None, metadata={"help": "a Dan:mul dataset URI to take uploads from"})
    split: str = field(default="test", metadata={"help": "split of --data"})
    limit: int = field(default=0, metadata={"help": "uploads at most (0: all)"})
    with_tags: float = field(default=0.5, metadata={
        "help": "fraction of --data uploads that come with their tags (the rest are image-only)"})
    tags: str | None = field(default=None, metadata={"help": "tags sent with every file/URI upload"})
    as_uri: bool = field(default=False, metadata={
        "help": "send local files as image_uri paths (the tagger needs --local-roots) instead of inline bytes"})
    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (default: AWS_ENDPOINT_URL)"})
    max_image_bytes: int = field(default=32 << 20, metadata={
        "help": "largest inline image sent; a larger file is refused before it reaches Redis (send it as a URI)"})


def _post_id(path: str, fallback: int) -> int:
    from ingest.schema import post_id_from_name

    post_id = post_id_from_name(path)
    return fallback if post_id is None else post_id


def uploads_from(s: EnqueueSettings, sources: list[str]) -> Iterator[dict]:
    """The uploads to add, as ``enqueue`` keyword arguments."""
    from ingest.storage import Storage, TooLarge, is_s3

    n = 0
    for i, src in enumerate(sources):
        if is_s3(src) or s.as_uri:
            yield {"post_id": _post_id(src, i + 1), "image_uri": src if is_s3(src) else os.path.abspath(src),
                   "tags": s.tags}
        else:
            try:  # never more than the limit read: a huge file is refused, not loaded
                image = Storage(src).read_bytes(max_bytes=s.max_image_bytes)
            except TooLarge:
                yield {"refused": f"{src} is over the {s.max_image_bytes:,}-byte limit for an inline image: send it "
                                  "as a URI the tagger may fetch"}
                continue
            yield {"post_id": _post_id(src, i + 1), "image": image, "tags": s.tags}
        n += 1
    if s.data:
        from ingest.shards import iter_examples

        every = round(1 / s.with_tags) if s.with_tags > 0 else 0
        for j, row in enumerate(iter_examples(Storage(s.data, s.endpoint_url), s.split)):
            if s.limit and n >= s.limit:
                return
            yield {"post_id": row["post_id"], "image": row["image"],
                   "tags": row["tags"] if every and j % every == 0 else None}
            n += 1


@dataclass
class Enqueued:
    count: int
    first: str | None
    last: str | None
    refused: list[str]  # uploads refused before reaching Redis (an inline image over the limit), with why


def enqueue_all(s: EnqueueSettings, sources: list[str], batch: int = 500) -> Enqueued:
    """Add the uploads in pipelined batches. An upload the tagger could only dead-letter (an inline image
    over ``max_image_bytes``) is refused here, before it reaches Redis, and reported."""
    from ingest.queue import Keys, connect, enqueue

    client = connect(s.redis)
    refused: list[str] = []
    keys = Keys(s.prefix)
    count, first, last = 0, None, None
    pipe = client.pipeline(transaction=False)
    pending = 0

    def flush() -> None:
        nonlocal first, last, pending
        ids = pipe.execute()
        if ids:
            first = first or ids[0].decode()
            last = ids[-1].decode()
        pending = 0

    for kwargs in uploads_from(s, sources):
        if "refused" in kwargs:
            refused.append(kwargs["refused"])
            continue
        try:
            enqueue(pipe, keys, **kwargs, max_image_bytes=s.max_image_bytes)
        except ValueError as e:
            refused.append(str(e))
            continue
        count += 1
        pending += 1
        if pending >= batch:
            flush()
    flush()
    client.close()
    return Enqueued(count, first, last, refused)
