"""The upload protocol on a Redis Cluster (three masters started here with ``--cluster-enabled yes`` and
``redis-cli --cluster create``): with a hash-tagged prefix (``{danmul}:``) every key of the protocol lives
in one slot, so the scripts run unchanged; the streaming tagger tags uploads there end to end. Without a
hash tag it refuses to start, naming the fix."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import pytest
import redis
from redis.cluster import RedisCluster

from ingest.queue import AsyncUploadQueue, Keys, RedisSetupError, check_server, connect, enqueue, result_fields
from ray_jobs.local_redis import RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEYS = Keys("{danmul}:")
PRED = {"characters": [["miku", 0.9]], "tags": {"solo": 0.8}, "model": "abc", "abstained": False}


def cluster_port() -> int:
    """A free port with a free cluster-bus port (port + 10,000, so at most 55,535)."""
    import socket

    while True:
        port = free_port()
        if port > 55_535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three masters, no replicas, all 16384 slots assigned; yields a node URL."""
    servers = []
    for _ in range(3):
        folder = tmp_path_factory.mktemp("node")
        args = ["--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf"),
                "--cluster-node-timeout", "5000"]
        servers.append(RedisServer(str(folder), cluster_port(), args=args))
    for s in servers:
        s.start()
    try:
        subprocess.run([shutil.which("redis-cli"), "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in servers],
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)  # fmt: skip
        deadline = time.monotonic() + 30
        while any(redis.Redis(port=s.port).execute_command("CLUSTER INFO")["cluster_state"] != "ok" for s in servers):
            assert time.monotonic() < deadline, "the cluster never became ok"
            time.sleep(0.2)
        yield f"redis://127.0.0.1:{servers[0].port}/0"
    finally:
        for s in servers:
            s.stop()


def test_the_protocol_runs_on_a_cluster_with_a_hash_tagged_prefix(cluster):
    sync = RedisCluster.from_url(cluster)
    assert check_server(connect(cluster, cluster=True), KEYS, cluster=True) == []
    with pytest.raises(RedisSetupError, match="hash tag"):
        check_server(connect(cluster, cluster=True), Keys("danmul:"), cluster=True)
    slots = {sync.keyslot(k) for k in (KEYS.uploads, KEYS.results, KEYS.dead, KEYS.attempts, KEYS.result(123))}
    assert len(slots) == 1

    async def scenario():
        client = connect(cluster, asyncio=True, cluster=True)
        q = AsyncUploadQueue(client, KEYS, "g", "a")
        await q.ensure_group()
        ids = [enqueue(sync, KEYS, i, image=b"x" * 10).decode() for i in range(5)]
        got = (await q.read(64, 1 << 20)).uploads
        assert [u.entry_id for u in got] == ids
        assert await q.complete(got[0], 0, result_fields(PRED), {"character": "miku"}) == 1
        assert await q.dead_letter(got[1], "truncated", "half a file")
        for _ in range(5):
            sync.xclaim(KEYS.uploads, "g", "other", 0, [ids[2]])
        await asyncio.sleep(0.05)
        reclaimed = await q.reclaim(min_idle_ms=10, count=64, budget_bytes=1 << 20, max_deliveries=5)
        assert [d.reason for d in reclaimed.dead] == ["poison"]
        for u in reclaimed.uploads:
            await q.complete(u, int(u.fields["post_id"]), result_fields(PRED), {})
        stats = await q.stats()
        await q.audit()
        trimmed = (await q.trim(keep_s=0)).uploads
        await client.aclose()
        return stats, trimmed

    stats, trimmed = asyncio.run(scenario())
    assert stats.pending == 0 and stats.lag == 0 and trimmed == 5
    assert sync.xlen(KEYS.results) == 3 and sync.xlen(KEYS.dead) == 2 and sync.exists(KEYS.result(0))


def test_the_streaming_tagger_on_a_cluster(cluster, ray_cluster, tiny_checkpoint, tiny_rows):
    from ray import serve

    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings

    keys = Keys("{tagger}:")
    sync = RedisCluster.from_url(cluster)
    ids = [enqueue(sync, keys, i, image=tiny_rows[i % len(tiny_rows)]["image"]).decode() for i in range(40)]
    try:
        deploy(ServeSettings(checkpoint=tiny_checkpoint, redis=cluster, redis_cluster=True, prefix=keys.prefix,
                             http_port=free_port(), metrics_port=free_port()))
        deadline = time.monotonic() + 180
        while sync.xlen(keys.results) < len(ids):
            assert time.monotonic() < deadline, f"{sync.xlen(keys.results)} of {len(ids)} tagged"
            time.sleep(0.5)
        time.sleep(1.0)
        assert sorted(e[b"upload_id"].decode() for _, e in sync.xrange(keys.results)) == sorted(ids)
        assert sync.xpending(keys.uploads, "danmul-taggers")["pending"] == 0
        undeploy()
    finally:
        serve.shutdown()
