"""The upload queue on Redis Streams: the protocol between a platform and danmul's streaming tagger.

A platform adds one entry per upload to ``{prefix}uploads``::

    XADD danmul:uploads * post_id 123 image_uri s3://bucket/123.jpg tags "1girl solo"

Consumers read it through one consumer group; each upload ends in exactly one of:

- a result: hash ``{prefix}result:{post_id}`` (``characters``, ``tags``, ``model``, ``processed_at``)
  plus one ``{prefix}results`` entry;
- a dead letter: one ``{prefix}dead`` entry with ``reason``, ``detail``, ``attempts`` and the original
  fields.

Either outcome is written by a Lua script that first ``XACK``s the upload and writes only when that
acknowledgement took the entry out of the pending list. A script runs atomically, so the result and
the acknowledgement land together, and an upload delivered twice (a slow consumer whose entry was
reclaimed, a retry after a lost reply) still produces one result. An upload is never acknowledged
without its result or dead letter: a consumer that dies leaves it pending, and another consumer
reclaims it after ``min_idle_ms`` (``XAUTOCLAIM``); past ``max_deliveries`` it is dead-lettered.

The commands here work with ``redis.Redis`` and ``redis.asyncio.Redis`` alike where they are one
round trip (they return the client's value or awaitable); :class:`AsyncUploadQueue` holds the
multi-step ones the consumer needs. No Ray here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

DEFAULT_PREFIX = "danmul:"
DEFAULT_GROUP = "danmul-taggers"
# Streams the platform reads are capped (approximately, which is cheap) so Redis memory stays bounded
# if nobody trims them; a platform that needs more history should consume them faster.
RESULTS_MAXLEN = 1_000_000
DEAD_MAXLEN = 100_000
DEAD_INLINE_IMAGE_MAX = 1 << 20  # an inline image larger than this is not copied into the dead letter

# Reason codes of dead letters, beside model.preprocess.ImageError's (empty, too_large, not_an_image,
# decompression_bomb, truncated).
MISSING_POST_ID = "missing_post_id"
BAD_POST_ID = "bad_post_id"
MISSING_IMAGE = "missing_image"
BAD_TAGS = "bad_tags"
NOT_FOUND = "not_found"
FORBIDDEN_PATH = "forbidden_path"
UNSUPPORTED_URI = "unsupported_uri"
MAX_DELIVERIES = "max_deliveries"

# KEYS: uploads stream, then the output key(s). ARGV: group, entry id, then the output's fields.
# XACK returns 1 only for the call that takes the entry out of the pending list: exactly one writer.
_COMPLETE_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local n = tonumber(ARGV[3])
local hash = {}
for i = 1, n do hash[#hash + 1] = ARGV[3 + i] end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(hash))
local ttl = tonumber(ARGV[4 + n])
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
local m = tonumber(ARGV[5 + n])
local entry = {}
for i = 1, m do entry[#entry + 1] = ARGV[5 + n + i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6 + n + m], '*', unpack(entry))
return 1
"""

_DEAD_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local entry = {}
for i = 4, #ARGV do entry[#entry + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(entry))
return 1
"""


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (default ``danmul:``)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def uploads(self) -> str:
        return f"{self.prefix}uploads"

    @property
    def results(self) -> str:
        return f"{self.prefix}results"

    @property
    def dead(self) -> str:
        return f"{self.prefix}dead"

    def result(self, post_id: int | str) -> str:
        return f"{self.prefix}result:{post_id}"


class BadUpload(ValueError):
    """An upload that can never succeed. ``reason`` is its dead-letter code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Upload:
    """One stream entry as delivered: its id, raw fields and how many times it has been delivered."""

    entry_id: str
    fields: dict[str, bytes]
    deliveries: int = 1

    @property
    def enqueued_at(self) -> float:
        """Unix seconds at which Redis accepted the entry."""
        return entry_ms(self.entry_id) / 1000.0

    def text(self, name: str) -> str | None:
        value = self.fields.get(name)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadUpload(f"bad_{name}", "not UTF-8") from None


@dataclass
class UploadRequest:
    """A validated upload: what the tagger needs to fetch the image and run the model."""

    post_id: int
    image_uri: str | None = None
    image: bytes | None = None
    tags: list[str] | None = None  # None: none came with the upload (image-only)


def parse_upload(upload: Upload, max_image_bytes: int) -> UploadRequest:
    """Validate an entry's fields. Raises :class:`BadUpload` for anything that can never succeed."""
    from model.vocab import parse_tag_string

    raw_id = upload.text("post_id")
    if raw_id is None or not raw_id.strip():
        raise BadUpload(MISSING_POST_ID)
    try:
        post_id = int(raw_id)
    except ValueError:
        raise BadUpload(BAD_POST_ID, f"{raw_id[:40]!r} is not an integer") from None
    if not 0 <= post_id < 2**63:
        raise BadUpload(BAD_POST_ID, f"{post_id} out of range")
    image = upload.fields.get("image")
    uri = upload.text("image_uri")
    if not image and not (uri and uri.strip()):
        raise BadUpload(MISSING_IMAGE, "neither image_uri nor image")
    if image is not None and len(image) > max_image_bytes:
        raise BadUpload("too_large", f"inline image of {len(image)} bytes > {max_image_bytes}")
    tags = None
    tag_text = upload.text("tags")
    if tag_text:
        try:
            tags = parse_tag_string(tag_text) or None
        except ValueError as e:
            raise BadUpload(BAD_TAGS, str(e)) from None
    return UploadRequest(post_id, uri.strip() if uri and not image else None, image or None, tags)


def connect(url: str, asyncio: bool = False, socket_timeout: float = 30.0, retries: int = 3,
            max_connections: int = 64) -> redis.Redis | aioredis.Redis:
    """A client for a ``redis://`` or ``rediss://`` (TLS) URL. The password comes from the URL or, so it
    stays off command lines, from ``REDIS_PASSWORD``. The socket timeout is longer than any
    ``XREADGROUP BLOCK`` we issue (redis-py 8's default of 5 s would cut blocking reads short);
    connection errors are retried with backoff."""
    kwargs: dict[str, Any] = dict(
        socket_timeout=socket_timeout, socket_connect_timeout=10.0, health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )  # fmt: skip
    if os.environ.get("REDIS_PASSWORD") and "@" not in url:
        kwargs["password"] = os.environ["REDIS_PASSWORD"]
    # A bounded pool that waits for a free connection: hundreds of uploads in flight share a few
    # connections instead of failing with "too many connections".
    pool_cls = aioredis.BlockingConnectionPool if asyncio else redis.BlockingConnectionPool
    pool = pool_cls.from_url(url, max_connections=max_connections, timeout=socket_timeout, **kwargs)
    return (aioredis.Redis if asyncio else redis.Redis)(connection_pool=pool)


def redact(url: str) -> str:
    """A Redis URL fit for logs: the password replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- one-round-trip commands (sync or async client) -------------------------------------------------------
def enqueue(client, keys: Keys, post_id: int | str | None, image_uri: str | None = None,
            image: bytes | None = None, tags: str | list[str] | None = None, **extra: str):
    """``XADD`` one upload; returns its entry id (or an awaitable for an async client)."""
    fields: dict[str, Any] = {}
    if post_id is not None:
        fields["post_id"] = str(post_id)
    if image_uri is not None:
        fields["image_uri"] = image_uri
    if image is not None:
        fields["image"] = image
    if tags:
        fields["tags"] = tags if isinstance(tags, str) else " ".join(tags)
    fields.update(extra)
    return client.xadd(keys.uploads, fields)


def decode_fields(raw: Mapping) -> dict[str, bytes]:
    """Stream fields as returned by redis-py (bytes keys) -> ``{str: bytes}``."""
    return {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): (v if isinstance(v, bytes) else
            str(v).encode()) for k, v in raw.items()}  # fmt: skip


def entry_ms(entry_id: bytes | str) -> int:
    """The Redis clock, in ms, at which a stream entry was added (the first half of its id)."""
    return int(_id(entry_id).split("-", 1)[0])


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class GroupStats:
    pending: int  # delivered to a consumer, not yet acknowledged
    lag: int  # entries not yet delivered to any consumer (Redis 7+); -1 when Redis cannot tell
    consumers: int


@dataclass
class AsyncUploadQueue:
    """The consumer side of the protocol, on an asyncio client."""

    client: aioredis.Redis
    keys: Keys = field(default_factory=Keys)
    group: str = DEFAULT_GROUP
    consumer: str = "consumer"
    results_maxlen: int = RESULTS_MAXLEN
    dead_maxlen: int = DEAD_MAXLEN
    result_ttl_s: int = 0  # 0: result hashes never expire

    def __post_init__(self) -> None:
        self._complete = self.client.register_script(_COMPLETE_LUA)
        self._dead = self.client.register_script(_DEAD_LUA)

    async def ensure_group(self) -> None:
        """Create the stream and the group if they do not exist (the group starts at the stream's start,
        so uploads added before the first consumer are processed)."""
        try:
            await self.client.xgroup_create(self.keys.uploads, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read(self, count: int, block_ms: int) -> list[Upload]:
        """New entries for this consumer (at most ``count``), waiting up to ``block_ms`` for one."""
        try:
            reply = await self.client.xreadgroup(self.group, self.consumer, {self.keys.uploads: ">"},
                                                 count=count, block=block_ms)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):  # the stream or group was deleted (or Redis lost it): recreate
                raise
            await self.ensure_group()
            return []
        return [Upload(_id(eid), decode_fields(raw)) for _, entries in reply or [] for eid, raw in entries
                if raw is not None]

    async def reclaim(self, min_idle_ms: int, count: int) -> list[Upload]:
        """Take over entries pending longer than ``min_idle_ms`` (their consumer died or hung), with their
        delivery counts. Entries deleted from the stream while pending are acknowledged and dropped."""
        reply = await self.client.xautoclaim(self.keys.uploads, self.group, self.consumer, min_idle_ms,
                                             start_id="0-0", count=count)
        claimed, deleted = reply[1], (reply[2] if len(reply) > 2 else [])
        if deleted:
            await self.client.xack(self.keys.uploads, self.group, *deleted)
        uploads = [Upload(_id(eid), decode_fields(raw)) for eid, raw in claimed if raw is not None]
        if uploads:
            pending = await self.client.xpending_range(
                self.keys.uploads, self.group, min=uploads[0].entry_id, max=uploads[-1].entry_id,
                count=len(uploads) + 1000, consumername=self.consumer)  # fmt: skip
            counts = {_id(p["message_id"]): int(p["times_delivered"]) for p in pending}
            for u in uploads:
                u.deliveries = counts.get(u.entry_id, 1)
        return uploads

    async def complete(self, upload: Upload, post_id: int, result: Mapping[str, str],
                       summary: Mapping[str, str]) -> bool:
        """Write the result hash and a ``results`` entry and acknowledge, atomically. False when another
        delivery of the same upload already did (nothing is written then)."""
        hash_fields = [x for kv in result.items() for x in kv]
        entry = [x for kv in {"post_id": str(post_id), "upload_id": upload.entry_id, **summary}.items() for x in kv]
        args = [self.group, upload.entry_id, len(hash_fields), *hash_fields, self.result_ttl_s, len(entry), *entry,
                self.results_maxlen]
        done = await self._complete(keys=[self.keys.uploads, self.keys.result(post_id), self.keys.results], args=args)
        return bool(done)

    async def dead_letter(self, upload: Upload, reason: str, detail: str = "") -> bool:
        """Move an upload to the dead-letter stream with its reason, acknowledged, atomically."""
        entry: dict[str, bytes | str] = {
            "post_id": upload.fields.get("post_id", b""), "reason": reason, "detail": detail[:500],
            "attempts": str(upload.deliveries), "upload_id": upload.entry_id,
        }  # fmt: skip
        for k, v in upload.fields.items():
            if k == "image" and len(v) > DEAD_INLINE_IMAGE_MAX:
                entry["image_bytes"] = str(len(v))  # too big to copy; its size says what it was
            elif k not in entry:
                entry[k] = v
        args = [self.group, upload.entry_id, self.dead_maxlen, *[x for kv in entry.items() for x in kv]]
        return bool(await self._dead(keys=[self.keys.uploads, self.keys.dead], args=args))

    async def stats(self) -> GroupStats:
        for g in await self.client.xinfo_groups(self.keys.uploads):
            if _id(g["name"]) == self.group:
                lag = g.get("lag")
                return GroupStats(int(g["pending"]), -1 if lag is None else int(lag), int(g["consumers"]))
        return GroupStats(0, -1, 0)


def result_fields(prediction: Mapping[str, Any], processed_at: float | None = None) -> dict[str, str]:
    """A ``Prediction.to_dict()`` -> the result hash's fields (JSON where the value is structured)."""
    return {
        "characters": json.dumps(prediction["characters"]),
        "tags": json.dumps(prediction["tags"]),
        "model": prediction["model"],
        "abstained": "1" if prediction.get("abstained") else "0",
        "processed_at": f"{processed_at if processed_at is not None else time.time():.3f}",
    }


def read_result(client: redis.Redis, keys: Keys, post_id: int | str) -> dict[str, Any] | None:
    """The result hash of a post, decoded (sync client), or None."""
    raw = client.hgetall(keys.result(post_id))
    if not raw:
        return None
    d = {k.decode(): v.decode() for k, v in raw.items()}
    return {**d, "characters": json.loads(d["characters"]), "tags": json.loads(d["tags"])}
