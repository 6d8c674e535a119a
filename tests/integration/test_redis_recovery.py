"""The promise when Redis comes back knowing only part of what was written: an append-only file whose replay
drops every MULTI/EXEC block (Redis 7.0's re-check of the default user's ACL at EXEC), a restart from a
snapshot taken mid-burst, a replica promoted before it had everything while the tagger reconnects through the
same address, and ``appendfsync everysec`` with kill -9. Each runs the real queue consumer in this process
against real redis-servers (the model is a stand-in), and asserts that every upload Redis still holds ends
with a result or a dead letter and nothing is left pending; what Redis forgot is done again and counted."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import time

import pytest
import redis
from consumer_harness import FakeModel, Proxy, counter, harness, stop

from dashboards import metrics
from ingest.queue import Keys, check_server, enqueue, replay_warning
from ray_jobs.local_redis import RedisServer

pytestmark = pytest.mark.integration
KEYS = Keys()
PASSWORD = "s3cret"
# Redis's own security advice (the default user off) as Redis 7.0 replays it: the default user may run nothing,
# and the replay re-checks its permissions at every EXEC, so every block of danmul's writes is dropped
UNSAFE_ACL = ["--user", "default", "off", "--user", "danmul", "on", f">{PASSWORD}", "~*", "&*", "+@all"]
# the safe form (docs/security.md, deploy/redis/danmul.conf): the default user still off, with every permission
SAFE_ACL = ["--user", "default", "off", "~*", "&*", "+@all", "--user", "danmul", "on", f">{PASSWORD}", "~*", "&*",
            "+@all"]  # fmt: skip
FAST = dict(claim_idle_s=1.0, stream_retention_s=0, trim_interval_s=0.2, max_deliveries=5)


def ids_of(c: redis.Redis, stream: str) -> list[str]:
    return [e[b"upload_id"].decode() for _, e in c.xrange(stream)]


def outcomes(c: redis.Redis) -> set[str]:
    return set(ids_of(c, KEYS.results)) | set(ids_of(c, KEYS.dead))


def pending(c: redis.Redis) -> int:
    try:
        return c.xpending(KEYS.uploads, "danmul-taggers")["pending"]
    except redis.ResponseError:
        return 0


def forgotten(c: redis.Redis) -> list[str]:
    """Entries Redis shows delivered and not pending, without a result or dead letter: what the old protocol
    read as finished (and then trimmed)."""
    [group] = c.xinfo_groups(KEYS.uploads)
    last = group["last-delivered-id"].decode()
    waiting = {p["message_id"].decode() for p in c.xpending_range(KEYS.uploads, "danmul-taggers", "-", "+", 10_000)}
    ended = outcomes(c)
    return [i.decode() for i, _ in c.xrange(KEYS.uploads, "-", last)
            if i.decode() not in waiting and i.decode() not in ended]  # fmt: skip


def burst(c: redis.Redis, posts: range, hostile_every: int = 0) -> list[str]:
    """Uploads of posts ``posts``; every ``hostile_every``-th one without a post_id (a dead letter)."""
    out = []
    for i in posts:
        if hostile_every and i % hostile_every == 0:
            out.append(c.xadd(KEYS.uploads, {"image": b"img"}).decode())
        else:
            out.append(enqueue(c, KEYS, i, image=b"img").decode())
    return out


async def until(c: redis.Redis, consumer, predicate, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (redis.ConnectionError, redis.ResponseError):
            pass
        assert time.monotonic() < deadline, f"timed out; consumer: {consumer.status()}"
        assert not consumer.loop_task.done(), consumer.loop_task
        await asyncio.sleep(0.05)


def all_ended(c: redis.Redis, ids: list[str]) -> bool:
    return set(ids) <= outcomes(c) and pending(c) == 0


# -- the append-only file replayed in part -------------------------------------------------------------------
def dropped_blocks(log_file: str) -> int:
    with open(log_file, errors="replace") as f:
        return sum("ACLs rules changed between the moment the transaction was accumulated" in line for line in f)


def drop_transactions(folder: str) -> int:
    """What Redis 7.0's replay does to the append-only file, done to the file itself: every MULTI ... EXEC block
    removed, plain commands kept (for a Redis whose replay does not drop them). Returns the blocks removed."""
    removed = 0
    for path in glob.glob(os.path.join(folder, "appendonlydir", "*.incr.aof")):
        with open(path, "rb") as f:
            data = f.read()
        out, pos, block = [], 0, None
        while pos < len(data):
            assert data[pos : pos + 1] == b"*", "not a RESP array"
            end = data.index(b"\r\n", pos)
            n, start = int(data[pos + 1 : end]), pos
            pos, args = end + 2, []
            for _ in range(n):
                end = data.index(b"\r\n", pos)
                size = int(data[pos + 1 : end])
                args.append(data[end + 2 : end + 2 + size])
                pos = end + 2 + size + 2
            name = args[0].upper()
            if name == b"MULTI":
                block = []
            elif name == b"EXEC":
                block, removed = None, removed + 1
            elif block is None:
                out.append(data[start:pos])
        with open(path, "wb") as f:
            f.write(b"".join(out))
    return removed


def test_the_default_users_rights_are_checked_and_the_unsafe_form_is_named(tmp_path):
    """danmul serve warns when the append-only file would drop its blocks on replay, names the fix, and says
    nothing when the server would not (the safe ACL) or when its user may not look."""
    for args, expect in ((UNSAFE_ACL, True), (SAFE_ACL, False)):
        folder = tmp_path / str(expect)
        folder.mkdir()
        with RedisServer(str(folder), args=args, username="danmul", password=PASSWORD) as server:
            client = redis.Redis(port=server.port, username="danmul", password=PASSWORD)
            warning = replay_warning(client, KEYS)
            assert (warning is not None) == expect, warning
            if expect:
                assert "XACK" in warning and "user default off ~* &* +@all" in warning
                assert any(w == warning for w in check_server(client, KEYS))
                client.acl_setuser("reader", enabled=True, passwords=["+r"], keys=["danmul:*"],
                                   commands=["+@stream", "+@hash", "+@scripting", "+ping", "+info"])  # fmt: skip
                limited = redis.Redis(port=server.port, username="reader", password="r")
                assert replay_warning(limited, KEYS) is None  # may not look: says nothing
            client.config_set("appendonly", "no")
            assert replay_warning(client, KEYS) is None


def shipped_config(tmp_path) -> list[str]:
    """deploy/redis/danmul.conf as an operator installs it: danmul's user given a password."""
    import pathlib

    text = (pathlib.Path(__file__).parents[2] / "deploy" / "redis" / "danmul.conf").read_text()
    assert "\nuser danmul off " in text
    conf = tmp_path / "danmul.conf"
    conf.write_text(text.replace("\nuser danmul off ", f"\nuser danmul on >{PASSWORD} "))
    return ["--include", str(conf)]


def crash_mid_work(tmp_path, args: list[str]) -> tuple[RedisServer, str, list[str]]:
    """148 good and 3 hostile uploads, as in the report (waves of one upload, read by single-entry reads that
    Redis logs as plain commands, between waves of 29, read and ended in blocks), worked through with trims on
    (retention 0); then Redis is killed and restarted on its files."""
    server = RedisServer(str(tmp_path), args=[*args, "--logfile", str(tmp_path / "redis.log")], username="danmul",
                         password=PASSWORD)
    server.start()
    url = f"redis://danmul:{PASSWORD}@127.0.0.1:{server.port}/0"
    c = redis.Redis.from_url(url)
    ids: list[str] = []

    async def first_run():
        consumer = harness(FakeModel(delay=0.02), url, max_in_flight=16, **FAST)
        try:
            for wave in range(10):
                size = 1 if wave % 2 else 29
                ids.extend(burst(c, range(len(ids), len(ids) + size), hostile_every=50))
                await until(c, consumer, lambda: all_ended(c, ids))
            await until(c, consumer, lambda: c.xlen(KEYS.uploads) == 0)  # trimmed (retention 0)
        finally:
            await stop(consumer)

    asyncio.run(first_run())
    assert len(ids) == 150 and len(outcomes(c)) == 150  # 147 good, 3 without a post_id
    server.kill()
    server.start()
    return server, url, ids


def test_an_append_only_file_replayed_without_its_blocks_loses_no_upload(tmp_path):
    """Redis 7.0's replay under the default user off: plain commands replay, every MULTI/EXEC block is dropped.
    The old protocol's single-entry reads were plain and its trim too, so entries came back behind the group's
    last-delivered id, not pending, without an outcome, and trimmed: 138 of these 150 uploads were lost. Every
    danmul write that moves the group or removes entries is now a block (a read writes where it got to), so the
    replay drops them all alike: nothing is left neither pending nor ended, and every upload ends again."""
    server, url, ids = crash_mid_work(tmp_path, [*UNSAFE_ACL, "--appendfsync", "always"])
    if dropped_blocks(str(tmp_path / "redis.log")) == 0:  # a Redis that replays blocks: drop them ourselves
        server.kill()
        assert drop_transactions(str(tmp_path)) > 0
        server.start()
    c = redis.Redis.from_url(url)
    assert c.xlen(KEYS.uploads) == len(ids)  # every XADD replayed (and no trim): Redis still holds every upload
    assert not outcomes(c)  # every result and dead letter was in a dropped block
    assert forgotten(c) == []  # and so was every read: nothing looks acknowledged without an outcome

    async def second_run():
        consumer = harness(FakeModel(delay=0.02), url, max_in_flight=16, **FAST)
        try:
            await until(c, consumer, lambda: all_ended(c, ids))
        finally:
            await stop(consumer)

    asyncio.run(second_run())
    assert outcomes(c) >= set(ids) and pending(c) == 0
    dead = {e[b"upload_id"].decode(): e[b"reason"] for _, e in c.xrange(KEYS.dead)}
    assert set(dead.values()) == {b"missing_post_id"}
    server.stop()


def test_the_shipped_redis_settings_replay_every_write(tmp_path):
    """The same work under deploy/redis/danmul.conf: the replay drops nothing, every outcome is still there,
    nothing is forgotten, and danmul serve has nothing to warn about."""
    server, url, ids = crash_mid_work(tmp_path, shipped_config(tmp_path))
    try:
        c = redis.Redis.from_url(url)
        assert dropped_blocks(str(tmp_path / "redis.log")) == 0
        assert outcomes(c) == set(ids) and pending(c) == 0 and c.xlen(KEYS.uploads) == 0
        assert check_server(c, KEYS, group="danmul-taggers") == []
    finally:
        server.stop()


def test_the_audit_finds_uploads_acknowledged_without_an_outcome_after_a_restart(redis_server):
    """What the audit is for, made by hand: uploads delivered and acknowledged with no result (an inconsistent
    state a partial replay of another kind could leave). After Redis restarts (another run), the audit makes them
    pending again and they are tagged; until it has walked past them, the trim does not remove them."""
    c = redis.Redis(port=redis_server.port)
    ids = burst(c, range(20))
    c.xgroup_create(KEYS.uploads, "danmul-taggers", id="0")
    c.hset(KEYS.state, "ledger_since", "0-0")  # a group made by a tagger with the ledger
    for entry_id, _ in c.xreadgroup("danmul-taggers", "lost", {KEYS.uploads: ">"}, count=12)[0][1]:
        c.xack(KEYS.uploads, "danmul-taggers", entry_id)
    redis_server.stop()
    redis_server.start()

    async def main():
        consumer = harness(FakeModel(), redis_server.url, **FAST)
        try:
            await until(c, consumer, lambda: all_ended(c, ids))
            return counter(consumer.metrics.RECOVERED, "acknowledgement")
        finally:
            await stop(consumer)

    before = counter(metrics.RECOVERED, "acknowledgement")
    assert asyncio.run(main()) - before == 12
    assert outcomes(c) == set(ids) and pending(c) == 0


# -- a restart from a snapshot taken mid-burst --------------------------------------------------------------
def test_a_restart_from_a_snapshot_taken_mid_burst_loses_no_upload(tmp_path):
    """A burst of 200; a snapshot (SAVE) once about a third have results; more results; kill -9 and a restart
    from the snapshot, without an append-only file. The consumer keeps running across the restart: what the
    snapshot does not hold is tagged again (a second result with the same upload_id), nothing is pending."""
    server = RedisServer(str(tmp_path), args=["--appendonly", "no"]).start()
    c = redis.Redis(port=server.port)
    ids = burst(c, range(200), hostile_every=67)

    async def main():
        consumer = harness(FakeModel(delay=0.05), server.url, max_in_flight=8, **{**FAST, "stream_retention_s": 3600})
        try:
            await until(c, consumer, lambda: len(outcomes(c)) >= 60)
            c.save()  # synchronous: the snapshot holds at most what is counted next
            at_snapshot = len(outcomes(c))
            await until(c, consumer, lambda: len(outcomes(c)) >= at_snapshot + 60)
            server.kill()
            server.start()
            restored = len(outcomes(redis.Redis(port=server.port)))
            await until(c, consumer, lambda: all_ended(c, ids))
            return at_snapshot, restored
        finally:
            await stop(consumer)

    at_snapshot, restored = asyncio.run(main())
    assert restored <= at_snapshot  # the restart forgot at least the 60 outcomes written after the snapshot
    assert outcomes(c) == set(ids) and pending(c) == 0
    assert len(ids_of(c, KEYS.results)) + len(ids_of(c, KEYS.dead)) == len(ids)  # the restored state had none twice
    server.stop()


# -- a replica promoted before it had everything -------------------------------------------------------------
def test_a_promoted_replica_that_missed_writes_loses_no_upload(tmp_path):
    """A primary and a replica; the consumer reaches Redis through one address (a proxy, as a Sentinel-aware
    service or a floating IP). Mid-burst the replica stops following (REPLICAOF NO ONE: it is promoted with what
    it has), the consumer goes on writing to the primary, then the primary is killed and the address moves to
    the replica. Every upload the replica holds ends, nothing is pending; uploads in flight whose delivery the
    replica never saw are written all the same and counted."""
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    primary = RedisServer(str(tmp_path / "p")).start()
    replica = RedisServer(str(tmp_path / "r"), args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    proxy = Proxy(primary.port)
    c = redis.Redis(port=primary.port)
    ids = burst(c, range(200), hostile_every=67)
    r = redis.Redis(port=replica.port)
    deadline = time.monotonic() + 30
    while r.xlen(KEYS.uploads) < len(ids):  # the replica has every upload (they were added before the burst)
        assert time.monotonic() < deadline
        time.sleep(0.05)

    async def main():
        consumer = harness(FakeModel(delay=0.05), proxy.url, max_in_flight=8, **{**FAST, "stream_retention_s": 3600})
        try:
            await until(c, consumer, lambda: len(outcomes(c)) >= 60)
            r.replicaof("NO", "ONE")  # promoted with what it has; the primary goes on
            at_split = len(outcomes(r))
            await until(c, consumer, lambda: len(outcomes(c)) >= at_split + 60)
            primary.kill()
            proxy.switch(replica.port)
            await until(r, consumer, lambda: all_ended(r, ids))
            return at_split, counter(consumer.metrics.RECOVERED, "delivery")
        finally:
            await stop(consumer)

    try:
        before = counter(metrics.RECOVERED, "delivery")
        at_split, recovered = asyncio.run(main())
        assert outcomes(r) == set(ids) and pending(r) == 0
        assert at_split < len(ids)
        # uploads in flight at the switch were read after the split: unknown to the replica, written, counted
        assert recovered - before >= 1
    finally:
        proxy.close()
        replica.stop()
        primary.stop()


# -- appendfsync everysec and kill -9 ------------------------------------------------------------------------
def test_everysec_and_kill_lose_no_upload_redis_still_holds(tmp_path):
    """With ``appendfsync everysec`` a kill -9 loses up to about a second of writes (a suffix): every upload
    the restarted Redis holds ends, nothing is pending."""
    server = RedisServer(str(tmp_path), args=["--appendfsync", "everysec"]).start()
    c = redis.Redis(port=server.port)
    ids = burst(c, range(200), hostile_every=67)

    async def main():
        consumer = harness(FakeModel(delay=0.05), server.url, max_in_flight=8, **{**FAST, "stream_retention_s": 3600})
        try:
            await until(c, consumer, lambda: len(outcomes(c)) >= 100)  # in flight, about a second after the last fsync
            server.kill()
            server.start()
            held = [i.decode() for i, _ in redis.Redis(port=server.port).xrange(KEYS.uploads)]
            await until(c, consumer, lambda: all_ended(c, held))
            return held
        finally:
            await stop(consumer)

    held = asyncio.run(main())
    assert held and set(held) <= set(ids) and outcomes(c) >= set(held) and pending(c) == 0
    server.stop()


# -- a Redis that hangs -----------------------------------------------------------------------------------------
def test_a_hung_redis_shows_in_the_consumers_health_within_seconds(redis_server):
    """redis-server stopped with SIGSTOP: the heartbeat's PING gets no answer and the consumer's status (what
    /health reports) says so long before a command timeout would; SIGCONT, and it is ok again."""

    async def main():
        consumer = harness(FakeModel(), redis_server.url)
        c = redis.Redis(port=redis_server.port)
        try:
            await until(c, consumer, lambda: consumer.status()["redis"] == "ok")
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                while consumer.status()["redis"] == "ok":
                    assert time.monotonic() - t0 < 30, "the stopped Redis never showed"
                    await asyncio.sleep(0.1)
                problem, shown_after = consumer.status()["redis"], time.monotonic() - t0
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            await until(c, consumer, lambda: consumer.status()["redis"] == "ok")
            return problem, shown_after
        finally:
            await stop(consumer)

    problem, shown_after = asyncio.run(main())
    print(f"a stopped redis-server showed in the consumer's status after {shown_after:.1f} s: {problem}")
    assert "does not answer" in problem


def test_consumers_that_left_their_names_behind_are_forgotten(redis_server):
    """Killed consumers' names pile up in the group; one with nothing pending, not heard from for long, is
    deleted; one with pending uploads is kept (deleting it would drop them)."""
    from ingest.queue import AsyncUploadQueue, connect

    c = redis.Redis(port=redis_server.port)
    burst(c, range(3))
    c.xgroup_create(KEYS.uploads, "danmul-taggers", id="0")
    for name in ("gone-1", "gone-2"):
        c.xgroup_createconsumer(KEYS.uploads, "danmul-taggers", name)
    c.xreadgroup("danmul-taggers", "busy", {KEYS.uploads: ">"}, count=1)
    time.sleep(0.3)

    async def main():
        client = connect(redis_server.url, asyncio=True)
        try:
            return await AsyncUploadQueue(client, KEYS, "danmul-taggers", "me").forget_consumers(max_idle_s=0.2)
        finally:
            await client.aclose()

    assert asyncio.run(main()) == 2
    assert [x["name"] for x in c.xinfo_consumers(KEYS.uploads, "danmul-taggers")] == [b"busy"]
