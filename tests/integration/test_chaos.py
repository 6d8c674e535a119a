"""A bounded chaos loop on the real streaming tagger: each round adds uploads, then, at a random moment, kills a
queue consumer or a model replica, or makes Redis come back knowing less than was written: kill -9 of
redis-server (append-only file, ``appendfsync always``: nothing is forgotten), the same with its replay
dropping every MULTI/EXEC block (the default user without permissions, Redis 7.0), a restart from a snapshot
taken mid-round, a replica promoted before it had everything (the tagger reaches Redis through one address that
moves to it), and kill -9 under ``appendfsync everysec``. After every round: each upload Redis still holds has a
result and none a dead letter, nothing is pending; an upload has two results (with the same ``upload_id``) only
when Redis forgot the first. The rounds and their victims are printed."""

from __future__ import annotations

import random
import shutil
import time

import pytest
import redis
from consumer_harness import Proxy

from ingest.queue import Keys, enqueue
from ray_jobs.local_redis import RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROUNDS = 21
PER_ROUND = 30
KEYS = Keys()
PASSWORD = "chaos"
USERS = ["--user", "danmul", "on", f">{PASSWORD}", "~*", "&*", "+@all", "--masteruser", "danmul", "--masterauth",
         PASSWORD]  # fmt: skip
SAFE_DEFAULT = ["--user", "default", "off", "~*", "&*", "+@all"]  # the shipped form (deploy/redis/danmul.conf)
UNSAFE_DEFAULT = ["--user", "default", "off"]  # no permissions: Redis 7.0's replay drops every block
KILLS = ("consumer", "model replica")
FORGETTING = ("partial replay", "snapshot", "failover", "everysec")  # Redis comes back knowing less
VICTIMS = (*KILLS, "redis-server", *FORGETTING)


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


class Redises:
    """The loop's Redis: a primary (append-only, ``appendfsync always``) and a replica following it, the tagger
    reaching the primary through a proxy whose address stays when a failover moves it."""

    def __init__(self, folder):
        self.folder, self.n = folder, 0
        self.primary = self._server(self._args())
        self.replica = self._replica()
        self.proxy = Proxy(self.primary.port)

    @staticmethod
    def _args(default: list[str] = SAFE_DEFAULT, appendonly: str = "yes") -> list[str]:
        return [*default, *USERS, "--appendonly", appendonly, "--appendfsync", "always"]

    def _server(self, args: list[str]) -> RedisServer:
        self.n += 1
        path = self.folder / f"redis-{self.n}"
        path.mkdir()
        return RedisServer(str(path), args=args, username="danmul", password=PASSWORD).start()

    def _replica(self) -> RedisServer:
        server = self._server([*self._args(), "--replicaof", "127.0.0.1", str(self.primary.port)])
        self.synced()  # its first full sync
        return server

    @property
    def url(self) -> str:
        return f"redis://danmul:{PASSWORD}@127.0.0.1:{self.proxy.port}/0"

    def client(self, server: RedisServer | None = None) -> redis.Redis:
        return redis.Redis(port=(server or self.primary).port, username="danmul", password=PASSWORD)

    def synced(self) -> None:
        """What a platform does when an upload must outlive a failover: WAIT until the replica has it."""
        assert self.client().execute_command("WAIT", 1, 30_000) == 1, "the replica did not catch up"

    def restart(self, default: list[str] = SAFE_DEFAULT, appendonly: str = "yes") -> None:
        """kill -9, and start again on the same files (``default``: the default user's rules while it loads;
        ``appendonly`` no: load the snapshot). The replica resyncs from what the primary now holds."""
        self.primary.kill()
        time.sleep(0.3)
        self.primary.args = self._args(default, appendonly)
        self.primary.start()
        c = self.client()
        if default is not SAFE_DEFAULT:
            # loaded: back to the safe form for the rounds to come, and the file rewritten from what is in memory;
            # else the next restart replays the blocks this one dropped, and the uploads they ended have two
            # results (right, since Redis forgot the first for a while, but not this round's doing)
            c.acl_setuser("default", enabled=False, keys=["*"], channels=["*"], commands=["+@all"])
            c.bgrewriteaof()
        if appendonly == "no":  # loaded from the snapshot: append-only again from here
            c.config_set("appendonly", "yes")
        deadline = time.monotonic() + 60
        while (p := c.info("persistence"))["aof_rewrite_in_progress"] or p.get("aof_rewrite_scheduled"):
            assert time.monotonic() < deadline, "the append-only file was not rewritten"
            time.sleep(0.1)
        self.primary.args = self._args()

    def forget(self, how: str, rng: random.Random) -> str:
        if how == "redis-server":
            self.restart()
        elif how == "partial replay":
            self.restart(UNSAFE_DEFAULT)
        elif how == "snapshot":
            self.client().save()
            time.sleep(rng.uniform(0.2, 1.0))  # more is written after it, then forgotten
            self.primary.kill()
            shutil.rmtree(f"{self.primary.folder}/appendonlydir")
            self.restart(appendonly="no")
        elif how == "failover":
            self.client(self.replica).replicaof("NO", "ONE")  # promoted with what it has; the primary goes on
            time.sleep(rng.uniform(0.2, 1.0))
            self.primary.kill()
            self.primary = self.replica
            self.primary.args = self._args()  # a restart keeps it a primary
            self.proxy.switch(self.primary.port)
            self.replica = self._replica()
        elif how == "everysec":
            self.client().config_set("appendfsync", "everysec")
            time.sleep(rng.uniform(0.2, 1.0))
            self.restart()  # back to always (the command line's)
        return f"port {self.primary.port}"

    def stop(self) -> None:
        self.proxy.close()
        for server in (self.primary, self.replica):
            server.stop()


def ended(c: redis.Redis) -> tuple[list[str], list[str]]:
    results = [e[b"upload_id"].decode() for _, e in c.xrange(KEYS.results)]
    dead = [e[b"upload_id"].decode() for _, e in c.xrange(KEYS.dead)]
    return results, dead


def wait_for_all(redises: Redises, ids: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            results, dead = ended(redises.client())
            if set(ids) <= set(results) | set(dead):
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.25)
    c = redises.client()
    results, dead = ended(c)
    missing = sorted(set(ids) - set(results) - set(dead))
    waiting = {p["message_id"].decode() for p in c.xpending_range(KEYS.uploads, "danmul-taggers", "-", "+", 10_000)}
    seen = [(i, bool(c.xrange(KEYS.uploads, i, i)), i in waiting, c.zscore(KEYS.done, ledger_member(i)))
            for i in missing[:5]]
    raise AssertionError(f"{len(missing)} uploads never ended; (id, in the stream, pending, ledger): {seen}; "
                         f"group {c.xinfo_groups(KEYS.uploads)}")


def settled(c: redis.Redis, timeout: float = 60) -> None:
    """Nothing pending, nothing undelivered (entries ended while Redis had forgotten their delivery are
    delivered again and acknowledged by the read: that may come just after their result)."""
    deadline = time.monotonic() + timeout
    while True:
        [group] = c.xinfo_groups(KEYS.uploads)
        if group["pending"] == 0 and group["lag"] == 0:
            return
        if time.monotonic() > deadline:
            info = c.xinfo_stream(KEYS.uploads)
            after = [i for i, _ in c.xrange(KEYS.uploads, b"(" + group["last-delivered-id"], "+")]
            raise AssertionError(f"not settled: {group}; stream length {info['length']}, last id "
                                 f"{info['last-generated-id']}, entries added {info['entries-added']}, max deleted "
                                 f"{info['max-deleted-entry-id']}; {len(after)} entries after the last delivered")
        time.sleep(0.25)


def ledger_member(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{int(ms):020d}-{int(seq):020d}"


def still_held(c: redis.Redis, ids: list[str]) -> list[str]:
    """The uploads of ``ids`` Redis still holds (in the stream, or ended): an XADD Redis forgot is not one."""
    results, dead = ended(c)
    known = set(results) | set(dead)
    return [i for i in ids if i in known or c.xrange(KEYS.uploads, i, i)]


def test_chaos_rounds_keep_every_upload(ray_cluster, tiny_checkpoint, tiny_rows, tmp_path):
    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings

    rng = random.Random(20261204)
    redises = Redises(tmp_path)
    s = ServeSettings(checkpoint=tiny_checkpoint, redis=redises.url, http_port=free_port(), metrics_port=free_port(),
                      consumers=2, min_replicas=2, max_replicas=2, replica_cpus=0.5, claim_idle_s=3, max_in_flight=16,
                      model_timeout_s=20, max_deliveries=5)  # fmt: skip
    victims = []
    for _ in range(ROUNDS // len(VICTIMS) + 1):  # every kind of victim several times, in a random order
        victims += rng.sample(VICTIMS, len(VICTIMS))
    deploy(s)
    added: list[str] = []
    try:
        for n, victim in enumerate(victims[:ROUNDS]):
            c = redises.client()
            pipe = c.pipeline(transaction=False)
            for i in range(PER_ROUND):
                row = tiny_rows[(n * PER_ROUND + i) % len(tiny_rows)]
                enqueue(pipe, KEYS, n * PER_ROUND + i, image=row["image"], tags=row["tags"] if i % 2 else None)
            added += [eid.decode() for eid in pipe.execute()]
            redises.synced()
            delay = rng.uniform(0.0, 0.8)  # 30 uploads take about a second: mid-work, mostly
            time.sleep(delay)
            results_before = ended(c)[0]
            twice_before, done_before = len(results_before) - len(set(results_before)), len(set(results_before))
            print(f"round {n + 1:2d}: {victim}", flush=True)
            if victim == "consumer":
                what = kill_actor("UploadConsumer", rng, s.consumers)
            elif victim == "model replica":
                what = kill_actor("TaggerModel", rng, s.min_replicas)
            else:
                what = redises.forget(victim, rng)
            c = redises.client()
            held = still_held(c, added)
            wait_for_all(redises, held)
            results, dead = ended(c)
            twice = len(results) - len(set(results))
            print(f"round {n + 1:2d}: {victim} ({what}) {delay:.1f} s in, {done_before} of {len(added)} done then; "
                  f"now {len(set(results))} results ({twice} uploads twice), {len(dead)} dead letters; "
                  f"{len(added) - len(held)} uploads forgotten by Redis")  # fmt: skip
            assert set(results) >= set(held) and dead == []
            if victim in KILLS or victim == "redis-server":  # nothing forgotten: nothing done twice
                assert twice == twice_before
            if victim != "everysec":  # the XADDs were on disk (always), in the snapshot or replicated (WAIT)
                assert len(held) == len(added)
            added = held
            settled(c)
    finally:
        undeploy()
        redises.stop()
