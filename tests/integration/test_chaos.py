"""A bounded chaos loop on the real streaming tagger: each round adds uploads, then kills, at a random
moment, a queue consumer, a model replica or redis-server itself (SIGKILL; append-only file with
``appendfsync always``, restarted on the same files). After every round: each upload added so far has
exactly one result, none has a dead letter, nothing is pending. The rounds and their victims are printed."""

from __future__ import annotations

import random
import time

import pytest
import redis

from ingest.queue import Keys, enqueue
from ray_jobs.local_redis import RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROUNDS = 20
PER_ROUND = 30
KEYS = Keys()


def replicas(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"])


def kill_actor(deployment: str, rng: random.Random, expected: int) -> str:
    """Kill one replica of ``deployment`` once Serve has all ``expected`` of them running again (an earlier
    round's victim may still be restarting)."""
    import ray

    deadline = time.monotonic() + 180
    while len(names := replicas(deployment)) < expected:
        assert time.monotonic() < deadline, f"{deployment}: {len(names)} of {expected} replicas after 180 s"
        time.sleep(0.5)
    victim = rng.choice(names)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    return victim.rsplit("#", 1)[-1]


def ended(c: redis.Redis) -> tuple[list[str], list[str]]:
    results = [e[b"upload_id"].decode() for _, e in c.xrange(KEYS.results)]
    dead = [e[b"upload_id"].decode() for _, e in c.xrange(KEYS.dead)]
    return results, dead


def wait_for_all(c: redis.Redis, ids: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            results, dead = ended(c)
            if set(ids) <= set(results) | set(dead):
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.25)
    results, dead = ended(c)
    raise AssertionError(f"{len(set(ids) - set(results) - set(dead))} uploads never ended")


def test_chaos_rounds_keep_every_upload_exactly_once(ray_cluster, tiny_checkpoint, tiny_rows, tmp_path):
    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings

    rng = random.Random(20261127)
    server = RedisServer(str(tmp_path), args=["--appendfsync", "always"]).start()
    c = redis.Redis(port=server.port)
    s = ServeSettings(checkpoint=tiny_checkpoint, redis=server.url, http_port=free_port(), metrics_port=free_port(),
                      consumers=2, min_replicas=2, max_replicas=2, replica_cpus=0.5, claim_idle_s=3, max_in_flight=16,
                      model_timeout_s=20, max_deliveries=5)  # fmt: skip
    victims = []
    for _ in range(ROUNDS // 3 + 1):  # every kind of victim several times, in a random order
        victims += rng.sample(["consumer", "model replica", "redis-server"], 3)
    deploy(s)
    added: list[str] = []
    try:
        for n, victim in enumerate(victims[:ROUNDS]):
            pipe = c.pipeline(transaction=False)
            for i in range(PER_ROUND):
                row = tiny_rows[(n * PER_ROUND + i) % len(tiny_rows)]
                enqueue(pipe, KEYS, n * PER_ROUND + i, image=row["image"], tags=row["tags"] if i % 2 else None)
            added += [eid.decode() for eid in pipe.execute()]
            delay = rng.uniform(0.0, 1.5)
            time.sleep(delay)
            done_before = len(ended(c)[0])
            if victim == "consumer":
                what = kill_actor("UploadConsumer", rng, s.consumers)
            elif victim == "model replica":
                what = kill_actor("TaggerModel", rng, s.min_replicas)
            else:
                server.kill()  # SIGKILL: no flush; every acknowledged write is already on disk (always)
                time.sleep(rng.uniform(0.5, 2.0))
                server.start()
                what = f"port {server.port}"
            wait_for_all(c, added)
            results, dead = ended(c)
            print(f"round {n + 1:2d}: killed {victim} ({what}) {delay:.1f} s in, {done_before} of {len(added)} "
                  f"done then; now {len(results)} results, {len(dead)} dead letters")
            assert len(results) == len(set(results)) == len(added) and set(results) == set(added)
            assert dead == []
            [group] = c.xinfo_groups(KEYS.uploads)
            assert group["pending"] == 0 and group["lag"] == 0
    finally:
        undeploy()
        server.stop()
