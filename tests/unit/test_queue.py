"""The upload-queue protocol against a real redis-server: validation, the exactly-once scripts,
reclaiming from dead consumers, dead letters."""

from __future__ import annotations

import asyncio

import pytest
import redis

from ingest.queue import (
    AsyncUploadQueue,
    BadUpload,
    Keys,
    Upload,
    connect,
    enqueue,
    parse_upload,
    read_result,
    redact,
    result_fields,
)

pytestmark = pytest.mark.integration
LIMIT = 1000


def up(**fields) -> Upload:
    return Upload("1700000000000-0", {k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()})


@pytest.mark.parametrize("fields,reason", [
    ({"image": b"x"}, "missing_post_id"),
    ({"post_id": " ", "image": b"x"}, "missing_post_id"),
    ({"post_id": "12a", "image": b"x"}, "bad_post_id"),
    ({"post_id": "-3", "image": b"x"}, "bad_post_id"),
    ({"post_id": "7"}, "missing_image"),
    ({"post_id": "7", "image_uri": "  "}, "missing_image"),
    ({"post_id": "7", "image": b"x" * (LIMIT + 1)}, "too_large"),
    ({"post_id": "7", "image": b"x", "tags": "a " * 5000}, "bad_tags"),
    ({"post_id": "7", "image": b"x", "tags": "ok\x07bell"}, "bad_tags"),
    ({"post_id": "7", "image_uri": b"\xff\xfe"}, "bad_image_uri"),
])  # fmt: skip
def test_bad_uploads_get_a_reason(fields, reason):
    with pytest.raises(BadUpload) as e:
        parse_upload(up(**fields), LIMIT)
    assert e.value.reason == reason


def test_good_upload_is_parsed():
    req = parse_upload(up(post_id="42", image_uri=" s3://b/42.jpg ", tags="1girl solo 1girl"), LIMIT)
    assert (req.post_id, req.image_uri, req.image, req.tags) == (42, "s3://b/42.jpg", None, ["1girl", "solo"])
    assert parse_upload(up(post_id="1", image=b"abc"), LIMIT).tags is None  # no tags: image-only
    assert up(post_id="1").enqueued_at == 1700000000.0


def test_redact_hides_the_password_only():
    assert redact("rediss://user:s3cret@redis.example:6380/0") == "rediss://user:***@redis.example:6380/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


PRED = {"characters": [["miku", 0.9]], "tags": {"solo": 0.8}, "model": "abc", "abstained": False}


def test_result_written_once_per_upload_whatever_the_deliveries(redis_server):
    async def scenario():
        client = connect(redis_server.url, asyncio=True)
        a = AsyncUploadQueue(client, Keys(), "g", "a")
        b = AsyncUploadQueue(client, Keys(), "g", "b")
        await a.ensure_group()
        await a.ensure_group()  # idempotent
        await enqueue(client, a.keys, 5, image=b"img")
        [got] = (await a.read(10, 1 << 20)).uploads
        # consumer a stalls; b reclaims the same entry after it went idle
        await asyncio.sleep(0.05)
        [again] = (await b.reclaim(min_idle_ms=10, count=10, budget_bytes=1 << 20, max_deliveries=5)).uploads
        assert again.entry_id == got.entry_id and again.deliveries == 2 and again.size == got.size > 0
        first = await b.complete(again, 5, result_fields(PRED), {"character": "miku"})
        second = await a.complete(got, 5, result_fields(PRED), {"character": "miku"})  # the slow one finishes
        dead = await a.dead_letter(got, "truncated")  # and cannot dead-letter it either
        stats = await a.stats()
        await client.aclose()
        return first, second, dead, stats

    first, second, dead, stats = asyncio.run(scenario())
    assert (first, second, dead) == (1, 0, False)
    c = redis.Redis(port=redis_server.port)
    k = Keys()
    assert c.xlen(k.results) == 1 and c.xlen(k.dead) == 0 and stats.pending == 0
    res = read_result(c, k, 5)
    assert res["characters"] == [["miku", 0.9]] and res["tags"] == {"solo": 0.8} and res["model"] == "abc"
    [(_, entry)] = c.xrange(k.results)
    assert entry[b"post_id"] == b"5" and entry[b"character"] == b"miku"


def test_dead_letter_keeps_reason_and_original_fields(redis_server):
    async def scenario():
        client = connect(redis_server.url, asyncio=True)
        q = AsyncUploadQueue(client, Keys("t:"), "g", "a")
        await q.ensure_group()
        await enqueue(client, q.keys, 9, image_uri="s3://b/missing.jpg", tags="solo")
        [u] = (await q.read(10, 1 << 20)).uploads
        ok = await q.dead_letter(u, "not_found", "s3://b/missing.jpg")
        stats = await q.stats()
        await client.aclose()
        return ok, stats

    ok, stats = asyncio.run(scenario())
    c = redis.Redis(port=redis_server.port)
    [(_, e)] = c.xrange("t:dead")
    assert ok and stats.pending == 0 and stats.lag == 0
    assert e[b"reason"] == b"not_found" and e[b"post_id"] == b"9" and e[b"attempts"] == b"1"
    assert e[b"image_uri"] == b"s3://b/missing.jpg" and e[b"tags"] == b"solo"


def test_backlog_is_read_in_bounded_slices_and_group_survives_deletion(redis_server):
    async def scenario():
        client = connect(redis_server.url, asyncio=True)
        q = AsyncUploadQueue(client, Keys(), "g", "a")
        await q.ensure_group()
        for i in range(50):
            await enqueue(client, q.keys, i, image=b"x")
        first = (await q.read(8, 1 << 20)).uploads
        stats = await q.stats()
        await client.delete(q.keys.uploads)  # someone deleted the stream: the next read recreates the group
        empty = (await q.read(8, 1 << 20)).uploads
        await enqueue(client, q.keys, 99, image=b"x")
        after = (await q.read(8, 1 << 20)).uploads
        await client.aclose()
        return first, stats, empty, after

    first, stats, empty, after = asyncio.run(scenario())
    assert len(first) == 8 and stats.pending == 8 and stats.lag == 42
    assert empty == [] and [u.fields["post_id"] for u in after] == [b"99"]

