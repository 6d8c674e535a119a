"""The queue consumer's own rules, run in this process against a real redis-server with a stand-in for the
model deployment's handle (the consumer is a plain class under Serve's decorator): a model call that
never answers is abandoned after ``model_timeout_s`` and the upload ends as ``max_deliveries`` naming
``model_timeout``; a model replica that dies under an upload every time makes it ``poison`` while the
uploads grouped with it are tagged; a Redis that answers a script with an error leaves the upload
pending with ``internal_error`` and the loop goes on; a fetch is waited for ``fetch_timeout_s`` at most
(``fetch_timeout``), and a URI over the length limit is dead-lettered at once."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import redis
from consumer_harness import POISON, FakeModel, consume, harness

from ingest.queue import Keys, enqueue

pytestmark = pytest.mark.integration
def pending(c: redis.Redis, keys: Keys) -> int:
    """Uploads delivered and not acknowledged (0 before the consumer made its group)."""
    try:
        return c.xpending(keys.uploads, "danmul-taggers")["pending"]
    except redis.ResponseError:
        return 0


def ended(c: redis.Redis, n: int) -> bool:
    keys = Keys()
    return c.exists(keys.uploads) and c.xlen(keys.results) + c.xlen(keys.dead) >= n


def test_a_model_that_never_answers_is_abandoned_and_named_in_the_dead_letter(redis_server):
    c = redis.Redis(port=redis_server.port)
    enqueue(c, Keys(), 1, image=b"img")
    consume(redis_server.url, FakeModel(delay=3600), lambda c: ended(c, 1), model_timeout_s=0.3, claim_idle_s=0.5,
            max_deliveries=2)  # fmt: skip
    [(_, dead)] = c.xrange(Keys().dead)
    assert dead[b"reason"] == b"max_deliveries" and dead[b"detail"].endswith(b"last: model_timeout")
    assert c.xpending(Keys().uploads, "danmul-taggers")["pending"] == 0


def test_a_grouped_call_its_uploads_all_gave_up_on_is_cancelled(redis_server):
    """The uploads of a group each wait ``model_timeout_s``; once none waits, the call itself is cancelled
    (Serve then cancels the replica's request, and its decode workers stop), not left running for nobody."""
    c = redis.Redis(port=redis_server.port)
    for i in range(6):
        enqueue(c, Keys(), i, image=b"img")
    model = FakeModel(delay=3600)
    consume(redis_server.url, model, lambda c: ended(c, 6) and model.cancelled >= len(model.calls),
            model_timeout_s=0.3, claim_idle_s=0.5, max_deliveries=2)  # fmt: skip
    assert model.cancelled == len(model.calls) and max(model.calls) > 1  # grouped calls included


def test_a_stop_leaves_an_unanswered_upload_pending_instead_of_waiting_out_the_model_timeout(redis_server):
    """A stop deletes the model with the consumers, so a call in flight may never be answered: it gets
    STOP_GRACE_S, then its upload stays pending for the next start, named ``model_unavailable``; the stop
    does not wait out ``model_timeout_s`` (an hour here, longer than the stop's own limit)."""
    from deploy.consumer import UploadConsumer

    c = redis.Redis(port=redis_server.port)
    keys = Keys()
    [upload] = [enqueue(c, keys, 1, image=b"img")]

    async def main():
        consumer = harness(FakeModel(delay=3600), redis_server.url, model_timeout_s=3600)
        deadline = time.monotonic() + 60
        while not pending(c, keys):  # delivered, its model call in flight
            assert time.monotonic() < deadline, "never delivered"
            await asyncio.sleep(0.05)
        await UploadConsumer.func_or_class.__del__(consumer)
        return consumer.loop_task.done()

    assert asyncio.run(main()), "the stop gave up on the loop instead of the loop ending"
    assert pending(c, keys) == 1  # left for the next start
    assert c.hget(keys.attempts, upload) == b"model_unavailable"
    assert c.xlen(keys.results) == 0 and c.xlen(keys.dead) == 0


def test_a_replica_killer_is_poison_and_its_group_mates_are_tagged(redis_server):
    c = redis.Redis(port=redis_server.port)
    ids = [enqueue(c, Keys(), i, image=b"img").decode() for i in range(10)]
    poison = enqueue(c, Keys(), 99, image=POISON).decode()
    ids += [enqueue(c, Keys(), 100 + i, image=b"img").decode() for i in range(10)]
    model = FakeModel(delay=0.01)
    consume(redis_server.url, model, lambda c: ended(c, 21), claim_idle_s=0.5, max_deliveries=3)
    results = sorted(e[b"upload_id"].decode() for _, e in c.xrange(Keys().results))
    [(_, dead)] = c.xrange(Keys().dead)
    assert results == sorted(ids)
    assert dead[b"upload_id"].decode() == poison and dead[b"reason"] == b"poison" and dead[b"attempts"] == b"3"
    assert max(model.calls) > 1  # uploads really were grouped, so the group mates saw the replica die too


def test_a_script_error_leaves_the_upload_pending_and_the_loop_goes_on(redis_server):
    c = redis.Redis(port=redis_server.port)
    keys = Keys()
    enqueue(c, keys, 1, image=b"img")
    c.set(keys.result(1), "an operator's string where the result hash goes")  # every write for post 1 fails
    enqueue(c, keys, 2, image=b"img")
    status = consume(redis_server.url, FakeModel(), lambda c: c.exists(keys.result(2)) and c.hlen(keys.attempts))
    assert status["running"] and c.hget(keys.attempts, c.xrange(keys.uploads, count=1)[0][0]) == b"internal_error"
    assert c.xpending(keys.uploads, "danmul-taggers")["pending"] == 1  # post 1 waits, nothing lost
    c.delete(keys.result(1))  # fixed: the next delivery completes it
    consume(redis_server.url, FakeModel(), lambda c: c.exists(keys.result(1)), claim_idle_s=0.5)
    assert c.xpending(keys.uploads, "danmul-taggers")["pending"] == 0 and c.hlen(keys.attempts) == 0


# -- fetches -------------------------------------------------------------------------------------------------
MIB = 1 << 20


def test_long_uris_are_dead_lettered_at_once_and_uri_uploads_go_on(redis_server, tmp_path):
    """The issue's case: six 1 MiB URIs under a local root held every URI upload for 5.5 min (os.path.realpath
    on each took over a minute, in the fetch threads every URI upload shares)."""
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "1.jpg").write_bytes(b"img")
    c = redis.Redis(port=redis_server.port)
    keys = Keys()
    long = [enqueue(c, keys, 100 + i, image_uri=f"{root}" + "/a" * (MIB // 2)) for i in range(6)]
    good = enqueue(c, keys, 1, image_uri=f"{root}/1.jpg")
    consume(redis_server.url, FakeModel(), lambda c: ended(c, 7), timeout=30, local_roots=str(root))
    dead = {e[b"upload_id"]: e for _, e in c.xrange(keys.dead)}
    assert sorted(dead) == sorted(long) and {e[b"reason"] for e in dead.values()} == {b"uri_too_long"}
    assert all(e[b"image_uri_bytes"] == str(len(str(root)) + MIB).encode() for e in dead.values())  # not copied
    [(_, result)] = c.xrange(keys.results)
    assert result[b"upload_id"] == good


def test_a_fetch_that_never_returns_releases_its_upload_at_the_deadline(redis_server):
    """A fetch thread that ignores its deadline (a read from a hung network mount: a thread cannot be killed)
    holds its thread, never the upload: the consumer stops waiting at ``fetch_timeout_s``, leaves the upload
    for another delivery as ``fetch_timeout``, and after ``max_deliveries`` it is dead-lettered naming it."""
    c = redis.Redis(port=redis_server.port)
    keys = Keys()
    upload = enqueue(c, keys, 1, image_uri="s3://pics/1.jpg")
    release = threading.Event()
    calls: list[float] = []

    def never_returns(uri, deadline):
        calls.append(deadline - time.monotonic())
        release.wait(60)  # until the upload has ended (asyncio.run waits for the thread before it returns)
        return b"img"

    def dead_lettered(c) -> bool:
        if ended(c, 1):
            release.set()
        return release.is_set()

    consume(redis_server.url, FakeModel(), dead_lettered, timeout=30, claim_idle_s=0.5, max_deliveries=2,
            fetch_timeout_s=0.3, allowed_buckets="pics",
            setup=lambda consumer: setattr(consumer.fetcher, "fetch", never_returns))  # fmt: skip
    [(_, dead)] = c.xrange(keys.dead)
    assert dead[b"upload_id"] == upload and dead[b"reason"] == b"max_deliveries"
    assert dead[b"detail"].endswith(b"last: fetch_timeout")
    assert len(calls) == 2 and all(0 < left <= 0.3 for left in calls)  # each thread was given the deadline


def test_an_s3_endpoint_that_never_answers_releases_the_upload_at_the_deadline(redis_server, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "danmul-test", "AWS_SECRET_ACCESS_KEY": "danmul-test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    c = redis.Redis(port=redis_server.port)
    keys = Keys()
    upload = enqueue(c, keys, 1, image_uri="s3://pics/1.jpg")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts; nobody ever answers
        consume(redis_server.url, FakeModel(), lambda c: ended(c, 1), timeout=60, claim_idle_s=0.5,
                max_deliveries=2, fetch_timeout_s=0.5, allowed_buckets="pics",
                endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}")  # fmt: skip
    [(_, dead)] = c.xrange(keys.dead)
    assert dead[b"upload_id"] == upload and dead[b"reason"] == b"max_deliveries"
    assert dead[b"detail"].endswith(b"last: fetch_timeout")
