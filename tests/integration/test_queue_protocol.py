"""The upload protocol's promise under hostile entries and operator mistakes, against a real redis-server:
every script checks before it writes and acknowledges last, so an upload is never acknowledged without its
result or dead letter; entries are read under a byte budget; reclaims continue their scan; uploads deleted
while pending, delivered too often or too large end as dead letters with a reason; trimming keeps whatever
a group still needs; credentials and eviction policies are checked at start-up."""

from __future__ import annotations

import asyncio

import pytest
import redis

from ingest.queue import (
    AsyncUploadQueue,
    Ended,
    Keys,
    RedisSetupError,
    check_server,
    connect,
    enqueue,
    read_result,
    redact,
    result_fields,
    without_password,
)
from ray_jobs.local_redis import RedisServer

pytestmark = pytest.mark.integration
PRED = {"characters": [["miku", 0.9]], "tags": {"solo": 0.8}, "model": "abc", "abstained": False}
MB = 1 << 20


def run(redis_url: str, scenario, **queue_kw):
    """Run ``scenario(queue, sync_client)`` on a fresh consumer queue (group g, consumer a)."""

    async def main():
        client = connect(redis_url, asyncio=True)
        q = AsyncUploadQueue(client, Keys(), "g", "a", **queue_kw)
        await q.ensure_group()
        try:
            return await scenario(q, redis.Redis.from_url(redis_url))
        finally:
            await client.aclose()

    return asyncio.run(main())


def pending(c: redis.Redis) -> int:
    return c.xpending(Keys().uploads, "g")["pending"]


def test_hundreds_of_fields_and_no_image_end_as_one_capped_dead_letter(redis_server):
    """Lua's unpack limit made the old dead-letter script fail after its XACK: acknowledged, then lost. Now
    a dead letter copies at most 32 of an upload's fields, and an entry of thousands of fields is
    dead-lettered as too_large when it is read, never sent to a consumer."""
    keys = Keys()

    async def scenario(q, c):
        c.xadd(keys.uploads, {"post_id": "5", **{f"f{i}": "v" * 10 for i in range(200)}})
        c.xadd(keys.uploads, {"post_id": "6", **{f"f{i}": "v" * 10 for i in range(5000)}})
        first = await q.read(10, MB)
        [u] = first.uploads
        assert len(u.fields) == 201
        assert await q.dead_letter(u, "missing_image", "neither image_uri nor image")
        return first.dead + (await q.read(10, MB)).dead

    [unread] = run(redis_server.url, scenario)
    c = redis.Redis(port=redis_server.port)
    assert unread.reason == "too_large" and "5001 fields" in unread.detail
    by_post = {e[b"post_id"]: e for _, e in c.xrange(keys.dead)}
    first, second = by_post[b"5"], by_post[b"6"]
    assert first[b"reason"] == b"missing_image"
    assert first[b"omitted_fields"] == str(200 - 32).encode() and len(first) <= 5 + 32 + 1
    assert second[b"post_id"] == b"6" and second[b"omitted_fields"] == str(5000 - 32).encode()
    assert pending(c) == 0


def test_a_failing_script_writes_nothing_and_leaves_the_upload_pending(redis_server):
    """An output key of the wrong type (an operator's SET on danmul:results) makes the script fail before its
    first write: no half-written result, no acknowledgement; once fixed, the same upload completes."""
    keys = Keys()

    async def scenario(q, c):
        enqueue(c, keys, 7, image=b"img")
        [u] = (await q.read(10, MB)).uploads
        c.set(keys.results, "not a stream")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await q.complete(u, 7, result_fields(PRED), {"character": "miku"})
        state = (c.exists(keys.result(7)), pending(c))
        c.delete(keys.results)
        done = await q.complete(u, 7, result_fields(PRED), {"character": "miku"})
        return state, done

    (hash_written, still_pending), done = run(redis_server.url, scenario)
    c = redis.Redis(port=redis_server.port)
    assert (hash_written, still_pending) == (0, 1)
    assert done == 1 and pending(c) == 0 and c.xlen(keys.results) == 1


def test_an_older_upload_never_replaces_a_newer_result_of_the_same_post(redis_server):
    keys = Keys()

    async def scenario(q, c):
        enqueue(c, keys, 9, image=b"old")
        enqueue(c, keys, 9, image=b"new")
        old, new = (await q.read(10, MB)).uploads
        first = await q.complete(new, 9, result_fields({**PRED, "model": "new"}), {"character": "miku"})
        second = await q.complete(old, 9, result_fields({**PRED, "model": "old"}), {"character": "miku"})
        return new.entry_id, first, second

    newest, first, second = run(redis_server.url, scenario)
    c = redis.Redis(port=redis_server.port)
    result = read_result(c, keys, 9)
    assert (first, second) == (1, 2)
    assert result["model"] == "new" and result["upload_id"] == newest
    entries = [e for _, e in c.xrange(keys.results)]
    assert len(entries) == 2 and entries[1][b"superseded"] == b"1" and pending(c) == 0


def test_reads_stop_at_the_byte_budget_and_oversize_entries_are_dead_lettered_unread(redis_server):
    keys = Keys()

    async def scenario(q, c):
        for i in range(6):
            enqueue(c, keys, i, image=b"x" * 1000)
        c.xadd(keys.uploads, {"post_id": "66", "image": b"y" * (3 * MB)})  # over max_entry_bytes
        enqueue(c, keys, 7, image=b"x" * 1000)
        first = await q.read(count=64, budget_bytes=2500)  # a budget for ~2 entries: 3 at most (one past)
        rest = await q.read(count=64, budget_bytes=10 * MB)
        after = await q.read(count=64, budget_bytes=10 * MB)
        return first, rest, after

    first, rest, after = run(redis_server.url, scenario, max_entry_bytes=MB)
    assert len(first.uploads) == 3 and not first.dead
    # the oversize entry ends the read it is met in: its body never reaches the consumer
    assert [u.fields["post_id"] for u in rest.uploads] == [b"3", b"4", b"5"]
    assert [(d.reason, "3145" in d.detail) for d in rest.dead] == [("too_large", True)]
    assert [u.fields["post_id"] for u in after.uploads] == [b"7"]
    c = redis.Redis(port=redis_server.port)
    [(_, dead)] = c.xrange(keys.dead)
    assert dead[b"post_id"] == b"66" and dead[b"image_bytes"] == str(3 * MB).encode() and b"image" not in dead


def test_reclaim_continues_its_scan_past_uploads_still_being_worked_on(redis_server):
    """XAUTOCLAIM looks at ~10 pending entries per COUNT; the cursor is kept, so idle uploads behind a run
    of busy ones are reached (restarting from 0-0 each time, they never were)."""
    keys = Keys()

    async def scenario(q, c):
        ids = [enqueue(c, keys, i, image=b"x").decode() for i in range(30)]
        await q.read(64, MB)  # all pending to consumer a, which dies
        await asyncio.sleep(0.1)
        c.xclaim(keys.uploads, "g", "busy", 0, ids[:20], justid=True)  # 20 taken over and being worked on
        first = await q.reclaim(min_idle_ms=50, count=3, budget_bytes=MB, max_deliveries=5)
        second = await q.reclaim(min_idle_ms=50, count=1, budget_bytes=MB, max_deliveries=5)
        return ids, first, second

    ids, first, second = run(redis_server.url, scenario)
    assert [u.entry_id for u in first.uploads] == [ids[20]] and [u.entry_id for u in second.uploads] == [ids[21]]
    assert first.uploads[0].deliveries == 2


def test_reclaim_ends_exhausted_deleted_and_oversize_uploads_by_id(redis_server):
    """An entry delivered max_deliveries times is dead-lettered by id, unread, with the reason its
    deliveries failed (poison when nothing recorded one: its consumer or replica died each time); an entry
    deleted while pending becomes a `deleted` dead letter instead of vanishing."""
    keys = Keys()

    async def scenario(q, c):
        ids = [enqueue(c, keys, i, image=b"x" * 100).decode() for i in range(6)]
        c.xadd(keys.uploads, {"post_id": "6", "image": b"y" * (2 * MB)})  # too large for this consumer
        ids.append(c.xrange(keys.uploads, count=7)[-1][0].decode())
        q.max_entry_bytes = 3 * MB
        await q.read(64, 10 * MB)  # all 7 pending to a consumer that then dies
        q.max_entry_bytes = MB  # (a consumer with a smaller limit reclaims them)
        c.xdel(keys.uploads, ids[1])  # an operator deletes one while it is pending
        for _ in range(4):  # deliveries 2..5 for ids[2..4] (each XCLAIM counts one)
            c.xclaim(keys.uploads, "g", "other", 0, [ids[2], ids[3], ids[4]])
        await q.record_attempt(ids[3], "fetch_error")
        await q.record_attempt(ids[4], "internal_error")
        await asyncio.sleep(0.02)
        return ids, await q.reclaim(min_idle_ms=10, count=64, budget_bytes=MB, max_deliveries=5)

    ids, got = run(redis_server.url, scenario)
    c = redis.Redis(port=redis_server.port)
    assert [u.entry_id for u in got.uploads] == [ids[0], ids[5]] and all(u.deliveries == 2 for u in got.uploads)
    dead = {d.entry_id: d.reason for d in got.dead}
    assert dead == {ids[1]: "deleted", ids[2]: "poison", ids[3]: "max_deliveries", ids[4]: "internal_error",
                    ids[6]: "too_large"}
    stored = {e[b"upload_id"].decode(): e for _, e in c.xrange(keys.dead)}
    assert stored[ids[3]][b"detail"].endswith(b"last: fetch_error") and stored[ids[2]][b"attempts"] == b"5"
    assert stored[ids[2]][b"post_id"] == b"2" and stored[ids[2]][b"image"] == b"x" * 100
    assert stored[ids[6]][b"image_bytes"] == str(2 * MB).encode()
    assert pending(c) == 2 and c.hlen(keys.attempts) == 0  # the 2 reclaimed ones, now ours


def test_trimming_keeps_every_undelivered_and_pending_upload(redis_server):
    keys = Keys()

    async def scenario(q, c):
        ids = [enqueue(c, keys, i, image=b"x") for i in range(300)]
        delivered = (await q.read(200, MB)).uploads  # 200 delivered, 100 never read (lag)
        for u in delivered[:150]:
            await q.complete(u, int(u.fields["post_id"]), result_fields(PRED), {})
        # 150 acknowledged, 50 pending (entries 150..199), 100 undelivered; and one old pending entry:
        await q.dead_letter(delivered[160], "test")
        unaudited = await q.trim(keep_s=0)  # the trim waits for this consumer's audit of this run of Redis
        await q.audit()
        kept_for_an_hour = await q.trim(keep_s=3600)
        trimmed = await q.trim(keep_s=0)
        again = await q.trim(keep_s=0)
        return ids, unaudited.uploads, kept_for_an_hour.uploads, trimmed.uploads, again.uploads

    ids, unaudited, kept, trimmed, again = run(redis_server.url, scenario)
    c = redis.Redis(port=redis_server.port)
    left = [eid for eid, _ in c.xrange(keys.uploads)]
    assert unaudited == 0 and kept == 0 and trimmed == 150 and again == 0
    assert c.zcard(keys.done) == 1  # the ledger keeps only what is still in the stream: the dead letter (160)
    assert left == ids[150:]  # the oldest pending one (150) and everything after it
    assert pending(c) == 49 and c.xinfo_groups(keys.uploads)[0]["lag"] == 100


def test_a_second_group_on_the_stream_is_respected_by_trimming(redis_server):
    keys = Keys()

    async def scenario(q, c):
        for i in range(10):
            enqueue(c, keys, i, image=b"x")
        c.xgroup_create(keys.uploads, "audit", id="0")  # a platform's own reader, behind ours
        for u in (await q.read(64, MB)).uploads:
            await q.complete(u, int(u.fields["post_id"]), result_fields(PRED), {})
        await q.audit()
        return (await q.trim(keep_s=0)).uploads

    trimmed = run(redis_server.url, scenario)
    assert trimmed == 0 and redis.Redis(port=redis_server.port).xlen(keys.uploads) == 10


def test_producer_helper_refuses_an_inline_image_over_the_limit(redis_server):
    c = redis.Redis(port=redis_server.port)
    with pytest.raises(ValueError, match="image_uri"):
        enqueue(c, Keys(), 1, image=b"x" * 101, max_image_bytes=100)
    assert c.exists(Keys().uploads) == 0


# -- credentials and server checks -----------------------------------------------------------------------
@pytest.fixture
def acl_redis(tmp_path):
    # the default user off, with every permission: the safe form for an append-only file (docs/security.md)
    acl = ["--user", "default", "off", "~*", "&*", "+@all",
           "--user", "danmul", "on", ">s3cret", "~danmul:*", "&*", "+@all"]  # fmt: skip
    server = RedisServer(str(tmp_path), args=acl, username="danmul", password="s3cret")
    server.start()
    yield server
    server.stop()


def test_redis_password_from_the_environment_works_with_a_user_in_the_url(acl_redis, monkeypatch):
    url = f"redis://danmul@127.0.0.1:{acl_redis.port}/0"
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    client = connect(url)
    assert check_server(client, Keys()) == [] and client.ping()
    monkeypatch.delenv("REDIS_PASSWORD")
    monkeypatch.setenv("REDIS_USERNAME", "danmul")
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    assert connect(f"redis://127.0.0.1:{acl_redis.port}/0").ping()  # both from the environment
    monkeypatch.setenv("REDIS_PASSWORD", "wrong")
    with pytest.raises(RedisSetupError, match="refused the credentials"):
        check_server(connect(url, retries=0), Keys())
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    with pytest.raises(RedisSetupError, match="may not use danmul's keys"):  # the ACL allows danmul:* only
        check_server(connect(url), Keys("other:"))


def test_an_evicting_redis_is_refused_unless_allowed(tmp_path):
    with RedisServer(str(tmp_path), args=["--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"]) as server:
        client = connect(server.url)
        with pytest.raises(RedisSetupError, match="allkeys-lru"):
            check_server(client, Keys())
        [warning] = check_server(client, Keys(), allow_eviction=True)
        assert "evict" in warning


def test_cluster_prefix_needs_a_hash_tag(redis_server):
    with pytest.raises(RedisSetupError, match="hash tag"):
        check_server(connect(redis_server.url), Keys("danmul:"), cluster=True)
    assert Keys("{danmul}:").hash_tag == "danmul" and Keys("danmul:").hash_tag is None


def test_redact_and_config_urls_hide_every_form_of_password():
    cases = {
        "redis://u:pa/ss?x#y@h:1/0": "redis://u:***@h:1/0",  # unencoded characters a URL parser would cut at
        "rediss://h/0?ssl_password=s3cret": "rediss://h/0?ssl_password=***",
        "rediss://user:s3cret@redis.example:6380/0": "rediss://user:***@redis.example:6380/0",
        "redis://:s3cret@h/0": "redis://:***@h/0",
        "redis://h:6379/0?password=s3cret&db=1": "redis://h:6379/0?password=***&db=1",
        "redis://u@h/0?username=u&Password=x": "redis://u@h/0?username=u&Password=***",
        "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/0",
    }
    for url, shown in cases.items():
        assert redact(url) == shown
        assert "s3cret" not in without_password(url) and "***" not in without_password(url)
    assert without_password("rediss://danmul:s3cret@h:6380/0?password=x&ssl_cert_reqs=required") == \
        "rediss://danmul@h:6380/0?ssl_cert_reqs=required"
    with pytest.raises(RedisSetupError, match="percent-encode") as e:  # redis-py would mis-parse it, and print it
        connect("redis://u:pa/ss@h:1/0")
    assert "pa/ss" not in str(e.value)



def test_uploads_being_worked_on_are_touched_so_they_are_not_reclaimed(redis_server):
    keys = Keys()

    async def scenario(q, c):
        enqueue(c, keys, 1, image=b"x")
        enqueue(c, keys, 2, image=b"x")
        slow, stale = (await q.read(64, MB)).uploads
        other = AsyncUploadQueue(q.client, keys, "g", "b")
        await asyncio.sleep(0.1)
        touched, _ = await q.touch([slow.entry_id])
        got = await other.reclaim(min_idle_ms=50, count=64, budget_bytes=MB, max_deliveries=5)
        late, _ = await q.touch([stale.entry_id])  # b owns it now: a's heartbeat must not take it back
        return touched, [u.entry_id for u in got.uploads], stale.entry_id, late

    touched, reclaimed, stale, late = run(redis_server.url, scenario)
    assert touched == 1 and reclaimed == [stale] and late == 0


def test_tls_redis_is_verified_against_the_given_ca(tmp_path, monkeypatch):
    from tls_certs import issue, make_ca, write_ca

    from ray_jobs.local_redis import free_port

    ca, ca_key = make_ca()
    ca_file = write_ca(ca, tmp_path)
    cert, key = issue(ca, ca_key, tmp_path, "localhost", ip="127.0.0.1")
    tls_port = free_port()
    args = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"]
    with RedisServer(str(tmp_path), args=args):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        assert check_server(connect(url, ca_file=str(ca_file)), Keys()) == []
        monkeypatch.setenv("REDIS_CA_FILE", str(ca_file))
        assert connect(url).ping()
        monkeypatch.delenv("REDIS_CA_FILE")
        with pytest.raises(RedisSetupError, match="not trusted"):  # the system's CAs do not know this one
            check_server(connect(url, retries=0), Keys())
        with pytest.raises(RedisSetupError, match="does not exist"):
            connect(url, ca_file=str(tmp_path / "missing.crt"))


def test_an_entry_deleted_while_being_worked_on_is_dead_lettered_by_the_heartbeat(redis_server):
    """XCLAIM (the heartbeat) drops a deleted entry from the pending list; the script dead-letters it there,
    so the upload is not lost between the heartbeat and the result write."""
    keys = Keys()

    async def scenario(q, c):
        enqueue(c, keys, 1, image=b"x")
        [u] = (await q.read(64, MB)).uploads
        c.xdel(keys.uploads, u.entry_id)  # an operator trims the stream while the upload is in flight
        touched, gone = await q.touch([u.entry_id])
        late = await q.complete(u, 1, result_fields(PRED), {})
        return u.entry_id, touched, gone, late

    eid, touched, gone, late = run(redis_server.url, scenario)
    c = redis.Redis(port=redis_server.port)
    [(_, dead)] = c.xrange(keys.dead)
    assert (touched, gone, late) == (0, [eid], Ended.GONE) and not late  # no longer in the stream: nothing written
    assert dead[b"reason"] == b"deleted" and dead[b"upload_id"].decode() == eid
    assert c.xlen(keys.results) == 0 and pending(c) == 0


def test_trimming_copes_with_the_largest_stream_ids(redis_server):
    keys = Keys()

    async def scenario(q, c):
        c.xadd(keys.uploads, {"post_id": "1", "image": "x"}, id="1000-18446744073709551615")
        [u] = (await q.read(64, MB)).uploads
        await q.complete(u, 1, result_fields(PRED), {})
        await q.audit()
        return (await q.trim(keep_s=0)).uploads

    assert run(redis_server.url, scenario) == 1


def test_entries_with_too_many_fields_are_dead_lettered_unread_and_fields_cost_bytes(redis_server):
    keys = Keys()

    async def scenario(q, c):
        c.xadd(keys.uploads, {f"f{i}": "" for i in range(1000)})  # 1,000 empty fields: about 6 KB of names
        c.xadd(keys.uploads, {"post_id": "2", **{f"f{i}": "" for i in range(100)}})
        return await q.read(64, MB), await q.read(64, MB)  # an unreadable entry ends the read it is met in

    first, second = run(redis_server.url, scenario)
    [dead] = first.dead
    assert dead.reason == "too_large" and "1000 fields" in dead.detail
    [u] = second.uploads
    assert u.size >= 101 * 64  # every field costs the consumer something
    c = redis.Redis(port=redis_server.port)
    [(_, entry)] = c.xrange(Keys().dead)
    assert int(entry[b"omitted_fields"]) == 1000 - 32


def test_a_dead_letter_keeps_one_inline_image_at_most(redis_server):
    keys = Keys()

    async def scenario(q, c):
        fields = [("post_id", b"3")] + [("image", b"i" * 300_000)] * 10  # repeated names are allowed in XADD
        c.execute_command("XADD", keys.uploads, "*", *[x for kv in fields for x in kv])
        [u] = (await q.read(64, 10 * MB)).uploads
        return await q.dead_letter(u, "not_an_image")

    assert run(redis_server.url, scenario)
    [(_, entry)] = redis.Redis(port=redis_server.port).xrange(Keys().dead)
    assert len(entry[b"image"]) == 300_000 and entry[b"image_bytes"] == b"300000"  # the rest by their size
    assert sum(len(v) for v in entry.values()) < 400_000


def test_stats_never_fetch_entry_bodies(redis_server):
    keys = Keys()

    async def scenario(q, c):
        enqueue(c, keys, 1, image=b"x" * (8 * MB))  # the stream's first and last entry
        before = c.info("stats")["total_net_output_bytes"]
        stats = await q.stats()
        return stats, c.info("stats")["total_net_output_bytes"] - before

    stats, sent = run(redis_server.url, scenario)
    assert stats.length == 1 and stats.lag == 1 and sent < 64 << 10


def test_start_up_refuses_what_would_stop_the_stream_later(redis_server):
    c = redis.Redis(port=redis_server.port)
    keys = Keys()
    client = connect(redis_server.url)
    c.set(keys.dead, "an operator's string")
    with pytest.raises(RedisSetupError, match="danmul:dead holds a string"):
        check_server(client, keys)
    c.delete(keys.dead)
    enqueue(c, keys, 1, image=b"x")
    c.xgroup_create(keys.uploads, "old-taggers", id="0")
    with pytest.raises(RedisSetupError, match="old-taggers"):  # a second group would tag everything again
        check_server(client, keys, group="danmul-taggers")
    [warning] = check_server(client, keys, group="danmul-taggers", allow_other_groups=True)
    assert "old-taggers" in warning
    assert check_server(client, keys, group="old-taggers") == []
    c.acl_setuser("limited", enabled=True, passwords=["+pw"], keys=["danmul:*"], channels=["*"],
                  commands=["+@all", "-xtrim"])
    with pytest.raises(RedisSetupError, match="XTRIM"):
        check_server(connect(f"redis://limited:pw@127.0.0.1:{redis_server.port}/0"), keys)


def test_settings_that_could_only_fail_later_are_refused():
    from deploy.settings import ServeSettings

    cases = {"top-k": {"top_k": 0}, "max-deliveries": {"max_deliveries": 0}, "claim-idle-s": {"claim_idle_s": 0},
             "tag-threshold": {"tag_threshold": 2.0}, "max-in-flight": {"max_in_flight": -1},
             "max-replicas": {"min_replicas": 2, "max_replicas": 1}, "prefix": {"prefix": ""}}  # fmt: skip
    for name, bad in cases.items():
        with pytest.raises(ValueError, match=name):
            ServeSettings(checkpoint="m", **bad)


# -- the basics: once per upload, dead letters, bounded slices --------------------------------------------
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


def test_a_stale_lag_is_set_right_once_nothing_waits(redis_server):
    """A replay or a replica does not carry a group's read counter, so after one Redis can report a lag for good
    while nothing waits (an alert on it would never clear). A read that finds nothing after the group's
    last-delivered id sets the counter right; while entries do wait, the lag is left alone."""
    keys = Keys()

    async def scenario(q, c):
        for i in range(10):
            enqueue(c, keys, i, image=b"x")
        await q.read(4, MB)
        waiting = c.xinfo_groups(keys.uploads)[0]["lag"]
        await q.read(64, MB)
        c.xgroup_setid(keys.uploads, "g", id=c.xinfo_groups(keys.uploads)[0]["last-delivered-id"], entries_read=4)
        stale = c.xinfo_groups(keys.uploads)[0]["lag"]
        corrected = (await q.read(64, MB)).lag_corrected  # said, so the consumer logs it
        return waiting, stale, corrected, c.xinfo_groups(keys.uploads)[0]

    waiting, stale, corrected, group = run(redis_server.url, scenario)
    assert (waiting, stale, corrected) == (6, 6, 6)
    assert group["lag"] == 0 and group["entries-read"] == 10 and group["pending"] == 10


def test_the_results_and_dead_letter_streams_are_capped_by_the_trim_keeping_the_newest(redis_server):
    """The platform-facing streams are capped by the periodic trim with XTRIM MINID (an approximate MAXLEN on
    each XADD was logged as an exact length, which a replay of another history applies to other entries)."""
    keys = Keys()

    async def scenario(q, c):
        for i in range(8):
            enqueue(c, keys, i, image=b"x")
        for u in (await q.read(64, MB)).uploads:
            post = int(u.fields["post_id"])
            if post < 6:
                await q.complete(u, post, result_fields(PRED), {})
            else:
                await q.dead_letter(u, "test")
        await q.trim(keep_s=3600)  # the caps need no audit: they cut only what is over them

    run(redis_server.url, scenario, results_maxlen=4, dead_maxlen=1)
    c = redis.Redis(port=redis_server.port)
    assert [e[b"post_id"] for _, e in c.xrange(keys.results)] == [b"2", b"3", b"4", b"5"]
    assert [e[b"post_id"] for _, e in c.xrange(keys.dead)] == [b"7"]
    assert c.xlen(keys.uploads) == 8  # kept for an hour


def test_one_trim_removes_every_ended_upload_whatever_their_size(redis_server):
    """The trim reads no upload: it cuts below the group's floor (and below this consumer's audit of this run of
    Redis), so 300 ended uploads of 512 KiB go in one call; the ledger's members go with them."""
    keys = Keys()

    async def scenario(q, c):
        pipe = c.pipeline(transaction=False)
        for i in range(300):
            enqueue(pipe, keys, i, image=b"x" * (512 << 10))
        pipe.execute()
        while uploads := (await q.read(64, 64 * MB)).uploads:
            for u in uploads:
                await q.complete(u, int(u.fields["post_id"]), result_fields(PRED), {})
        while not q.audit_state.caught_up:
            await q.audit()
        return await q.trim(keep_s=0)

    trimmed = run(redis_server.url, scenario)
    c = redis.Redis(port=redis_server.port)
    assert trimmed.uploads == 300 and c.xlen(keys.uploads) == 0 and c.zcard(keys.done) == 0


def test_a_cap_over_its_budget_says_so_and_the_next_trim_goes_on(redis_server):
    keys = Keys()

    async def scenario(q, c):
        for i in range(30):
            enqueue(c, keys, i, image=b"x")
        for u in (await q.read(64, MB)).uploads:
            await q.complete(u, int(u.fields["post_id"]), result_fields(PRED), {})
        return [await q.trim(keep_s=3600, cap_entries=8) for _ in range(3)]

    first, second, third = run(redis_server.url, scenario, results_maxlen=10)
    assert (first.results, first.more) == (8, True) and (second.results, second.more) == (8, True)
    assert (third.results, third.more) == (4, False) and redis.Redis(port=redis_server.port).xlen(keys.results) == 10


def test_a_ledger_member_left_behind_by_an_entry_deleted_by_hand_goes_with_the_next_trim(redis_server):
    keys = Keys()

    async def scenario(q, c):
        for i in range(3):
            enqueue(c, keys, i, image=b"x")
        a, b, d = (await q.read(64, MB)).uploads
        c.xdel(keys.uploads, a.entry_id)  # deleted while pending: its result is written, its member left behind
        for u in (a, b, d):
            await q.complete(u, int(u.fields["post_id"]), result_fields(PRED), {})
        left_behind = c.zcard(keys.done)
        await q.audit()
        return left_behind, await q.trim(keep_s=0)

    left_behind, trimmed = run(redis_server.url, scenario)
    assert left_behind == 3 and trimmed.uploads == 2 and redis.Redis(port=redis_server.port).zcard(keys.done) == 0


def test_uploads_a_tagger_without_the_ledger_ended_are_not_done_again(redis_server):
    """A group run by a tagger before the ledger: what it delivered and acknowledged counts as ended (ledger_since
    is its last-delivered id when the new tagger first meets it), so the audit finds nothing to do again, even
    the dead letters and superseded results whose result hash does not name them; the trim removes them."""
    keys = Keys()
    c = redis.Redis(port=redis_server.port)
    for i in range(6):
        enqueue(c, keys, i % 4, image=b"x")
    c.xgroup_create(keys.uploads, "g", id="0")
    for entry_id, _ in c.xreadgroup("g", "old", {keys.uploads: ">"}, count=6)[0][1]:
        c.xack(keys.uploads, "g", entry_id)  # the old protocol's outcome scripts, as far as the group shows
    enqueue(c, keys, 9, image=b"x")  # and one it never read

    async def scenario(q, c):
        while not q.audit_state.caught_up:
            found = await q.audit()
            assert found == 0
        [u] = (await q.read(64, MB)).uploads
        await q.complete(u, 9, result_fields(PRED), {})
        return await q.trim(keep_s=0)

    trimmed = run(redis_server.url, scenario)
    assert trimmed.uploads == 7 and pending(c) == 0 and c.xlen(keys.results) == 1


def test_check_server_names_every_command_the_scripts_use(acl_redis):
    """Every command a script calls is tried at start-up under the user's ACL: a user without one (EXISTS here)
    is refused then, not failing every trim and audit later; so is a user without INFO."""
    import re

    from ingest import queue

    called = set()
    for name in dir(queue):
        if name.endswith("_LUA") and isinstance(getattr(queue, name), str) and name != "_PROBE_LUA":
            called |= {m.upper() for m in re.findall(r"redis\.p?call\('([A-Za-z]+)'", getattr(queue, name))}
    probed = {m.upper() for m in re.findall(r"try\('([A-Za-z]+)'", queue._PROBE_LUA)}
    assert called - {"INFO"} <= probed, called - probed  # INFO is checked on its own, below
    admin = redis.Redis(port=acl_redis.port, username="danmul", password="s3cret")
    admin.acl_setuser("noexists", enabled=True, passwords=["+p"], keys=["danmul:*"], channels=["*"],
                      commands=["+@all", "-exists"])  # fmt: skip
    admin.acl_setuser("noinfo", enabled=True, passwords=["+p"], keys=["danmul:*"], channels=["*"],
                      commands=["+@all", "-info"])  # fmt: skip
    with pytest.raises(RedisSetupError, match="EXISTS"):
        check_server(redis.Redis(port=acl_redis.port, username="noexists", password="p"), Keys())
    with pytest.raises(RedisSetupError, match=r"may not run INFO.*\+info"):  # without it a restart goes unseen
        check_server(redis.Redis(port=acl_redis.port, username="noinfo", password="p"), Keys())
