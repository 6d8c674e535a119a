"""The queue consumer's own rules, run in this process against a real redis-server with a stand-in for the
model deployment's handle (the consumer is a plain class under Serve's decorator): a model call that
never answers is abandoned after ``model_timeout_s`` and the upload ends as ``max_deliveries`` naming
``model_timeout``; a model replica that dies under an upload every time makes it ``poison`` while the
uploads grouped with it are tagged; a Redis that answers a script with an error leaves the upload
pending with ``internal_error`` and the loop goes on."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from ingest.queue import Keys, enqueue

pytestmark = pytest.mark.integration
GOOD = {"characters": [["miku", 0.9]], "tags": {"solo": 0.8}, "model": "m", "abstained": False,
        "best_character": ["miku", 0.9]}  # fmt: skip
POISON = b"kills the replica"


class FakeModel:
    """``model.tag_many.remote(images, tags)`` as the consumer calls it: answers after ``delay`` seconds, or
    raises ActorDiedError (as a handle does when the replica died) when the poison bytes are in the call."""

    def __init__(self, delay: float = 0.0):
        self.tag_many, self.delay, self.calls, self.cancelled = self, delay, [], 0

    def remote(self, images, tags, *args):
        self.calls.append(len(images))

        async def answer():
            from ray.exceptions import ActorDiedError

            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:  # as Serve cancels the request on the replica
                self.cancelled += 1
                raise
            if any(bytes(i) == POISON for i in images):
                raise ActorDiedError()
            return [dict(GOOD) for _ in images]

        return answer()


def harness(model: FakeModel, redis_url: str, **settings):
    """A consumer in this process (call it inside a running event loop); stop it by awaiting
    ``UploadConsumer.func_or_class.__del__(consumer)``, as Serve does."""
    from deploy.consumer import UploadConsumer

    class Harness(UploadConsumer.func_or_class):
        def __del__(self) -> None:  # stopped by awaiting the real one (Serve awaits it the same way)
            pass

    return Harness(model, {"checkpoint": "m", "redis": redis_url, "metrics_port": 0, **settings})


def consume(redis_url: str, model: FakeModel, until, timeout: float = 60, **settings):
    """Run one consumer until ``until(sync_client)`` holds (or fail after ``timeout``)."""
    from deploy.consumer import UploadConsumer

    async def main():
        consumer = harness(model, redis_url, **settings)
        c = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + timeout
        try:
            while not until(c):
                assert time.monotonic() < deadline, "timed out"
                assert not consumer.loop_task.done(), consumer.loop_task
                await asyncio.sleep(0.1)
            return consumer.status()
        finally:
            await UploadConsumer.func_or_class.__del__(consumer)

    return asyncio.run(main())


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
