"""Hostile uploads through the real streaming tagger (redis-server, Ray Serve on CPU, a tiny model): the
images and entries an attacker would pick, batched together with good uploads. Every good upload ends in
exactly one result; every hostile one in exactly one result or one dead letter with a known reason; no
model replica dies; nothing stays pending; the tagger trims what it acknowledged. And an image that does
take its model replica down each time (a test double that crashes on it) ends as a `poison` dead letter
while the uploads batched with it are tagged."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import asdict

import pytest
import redis
from hostile_images import corpus, mutations, small_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.queue import Keys, enqueue, read_result
from ray_jobs.local_redis import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MB = 1 << 20
HTTP_PORT = free_port()  # every app of the module: Serve's proxy keeps the port of the first deploy
UPLOAD_REASONS = {"missing_post_id", "bad_post_id", "missing_image", "bad_tags", "bad_image_uri", "not_found",
                  "forbidden_path", "forbidden_bucket", "forbidden_address", "unsupported_uri", "too_large",
                  "max_deliveries", "poison", "internal_error", "deleted", "bad_request", "model_error",
                  "uri_too_long"}


def known_reasons() -> set[str]:
    from model.preprocess import REASONS

    return UPLOAD_REASONS | set(REASONS)


def replicas(deployment: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]}


def outcomes(c: redis.Redis, keys: Keys) -> tuple[Counter, dict[str, bytes]]:
    """How many results each upload id got, and the reason of each dead-lettered upload id."""
    results = Counter(e[b"upload_id"].decode() for _, e in c.xrange(keys.results))
    dead: dict[str, bytes] = {}
    for _, e in c.xrange(keys.dead):
        uid = e[b"upload_id"].decode()
        assert uid not in dead and uid not in results, f"{uid} ended twice"
        dead[uid] = e[b"reason"]
    return results, dead


def wait_until_ended(c: redis.Redis, keys: Keys, ids: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results, dead = outcomes(c, keys)
        if all(i in results or i in dead for i in ids):
            time.sleep(1.0)  # a duplicate would show up now
            return
        time.sleep(0.25)
    results, dead = outcomes(c, keys)
    missing = [i for i in ids if i not in results and i not in dead]
    raise AssertionError(f"{len(missing)} of {len(ids)} uploads never ended, e.g. {missing[:3]}")


def test_hostile_uploads_batched_with_good_ones(ray_cluster, module_redis, tiny_checkpoint, tiny_rows, tmp_path):
    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings

    keys = Keys("h:")
    c = redis.Redis(port=module_redis.port)
    root = tmp_path / "uploads"
    root.mkdir()
    expect: dict[str, str] = {}  # upload id -> "result" or the dead letter's reason
    good: list[str] = []

    def add(outcome: str, fields: dict) -> str:
        eid = c.xadd(keys.uploads, fields).decode()
        expect[eid] = outcome
        return eid

    def add_good(i: int) -> None:
        row = tiny_rows[i % len(tiny_rows)]
        fields = {"post_id": str(1000 + i), "image": row["image"]}
        if i % 2:
            fields["tags"] = " ".join(row["tags"])
        good.append(add("result", fields))

    # An upload another reader of the group took and dropped, deleted by hand while pending (below).
    ghost = add("deleted", {"post_id": "7001", "image": tiny_rows[0]["image"]})
    c.xgroup_create(keys.uploads, "danmul-taggers", id="0")
    assert c.xreadgroup("danmul-taggers", "ghost", {keys.uploads: ">"}, count=1)[0][1][0][0].decode() == ghost
    # A group of images the way a platform would see them: good ones all around the hostile ones.
    for i in range(40):
        add_good(i)
    for n, (name, (data, expected)) in enumerate(corpus().items()):
        outcome = "result" if expected == "ok" else expected if data else "missing_image"  # b"": no image at all
        add(outcome, {"post_id": str(5000 + n), "image": data, "name": name})
        add_good(100 + n)
    image = tiny_rows[0]["image"]
    many = {f"field{i}": f"value{i}" for i in range(5000)}
    add("result", {"post_id": "6000", "image": image, **dict(list(many.items())[:200])})  # fields around an image
    add("too_large", {"post_id": "6001", "image": image, **many})  # thousands of fields: dead-lettered unread
    add("too_large", {"post_id": "6002", **many})  # ... a capped dead letter either way
    add("too_large", {"post_id": "6003", "image": b"\xff" * (50 * MB)})  # a 50 MB entry: dead-lettered unread
    add("bad_post_id", {"post_id": "9" * 100_000, "image": image})
    add("missing_post_id", {"image": image, b"\xff\xfe": b"\x00" * 10})
    add("bad_tags", {"post_id": "6005", "image": image, "tags": "tag " * 20_000})
    add("bad_tags", {"post_id": "6006", "image": image, "tags": b"\xff\xfe\xfd"})
    add("result", {"post_id": "6007", "image": image, "reason": "fake", "upload_id": "0-1", "detail": "x"})
    add("forbidden_bucket", {"post_id": "6008", "image_uri": "s3://someone-elses-bucket/secret.jpg"})
    add("unsupported_uri", {"post_id": "6009", "image_uri": "http://169.254.169.254/latest/meta-data/"})
    add("forbidden_path", {"post_id": "6010", "image_uri": "/etc/passwd"})
    add("forbidden_path", {"post_id": "6011", "image_uri": f"{root}/../../etc/passwd"})
    (root / "6012.jpg").write_bytes(image)
    add("result", {"post_id": "6012", "image_uri": f"file://{root}/6012.jpg"})
    add("uri_too_long", {"post_id": "6013", "image_uri": f"{root}" + "/a" * (MB // 2)})  # realpath: a minute
    os.mkfifo(root / "6014.jpg")
    add("not_found", {"post_id": "6014", "image_uri": f"{root}/6014.jpg"})  # a FIFO: would wait for a writer
    for i in range(20):
        add_good(200 + i)
    # the same post twice: the result hash keeps the newer upload's result
    older = add("result", {"post_id": "7000", "image": tiny_rows[1]["image"]})
    newer = add("result", {"post_id": "7000", "image": tiny_rows[2]["image"]})

    s = ServeSettings(checkpoint=tiny_checkpoint, redis=module_redis.url, prefix=keys.prefix, http_port=HTTP_PORT,
                      metrics_port=free_port(), local_roots=str(root), max_in_flight=32, claim_idle_s=3,
                      stream_retention_s=0, trim_interval_s=1, max_in_flight_bytes=64 * MB)  # fmt: skip
    c.xdel(keys.uploads, ghost)
    deploy(s)
    try:
        before = replicas("TaggerModel")
        wait_until_ended(c, keys, list(expect))
        results, dead = outcomes(c, keys)
        for eid, outcome in expect.items():
            got = "result" if eid in results else dead[eid].decode()
            assert got == outcome, f"{eid} ({outcome}): got {got}"
            assert results[eid] <= 1
        assert set(d.decode() for d in dead.values()) <= known_reasons()
        assert replicas("TaggerModel") == before  # no model replica died
        assert read_result(c, keys, 7000)["upload_id"] == newer and older in results
        [group] = [g for g in c.xinfo_groups(keys.uploads) if g["name"] == b"danmul-taggers"]
        assert group["pending"] == 0 and group["lag"] == 0
        [capped] = [e for _, e in c.xrange(keys.dead) if e[b"post_id"] == b"6002"]
        assert len(capped) < 45 and int(capped[b"omitted_fields"]) > 4900
        [unread] = [e for _, e in c.xrange(keys.dead) if e[b"post_id"] == b"6003"]
        assert unread[b"image_bytes"] == str(50 * MB).encode()
        deadline = time.monotonic() + 30  # the tagger trims what it acknowledged (retention 0 here)
        while c.xlen(keys.uploads) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert c.xlen(keys.uploads) == 0
    finally:
        undeploy()


# -- poison: an upload that takes its model replica down each time -----------------------------------------
POISON = b"this upload crashes the model replica"


def crashing_model():
    """A model deployment that dies (os._exit, as an OOM kill would) on the poison bytes and answers the
    rest like the real one: a test double for an image that kills replicas, used with the real consumer."""
    from ray import serve

    from deploy.app import HEALTH_CHECK_PERIOD_S

    @serve.deployment(max_ongoing_requests=64, health_check_period_s=HEALTH_CHECK_PERIOD_S)
    class CrashOnPoison:
        def __init__(self, checkpoint: str):
            from model.tagger import Tagger

            self.tagger = Tagger.from_checkpoint(checkpoint)

        async def tag_many(self, images, tags, threshold=None, top_k=None):
            if any(bytes(i) == POISON for i in images):
                os._exit(1)
            preds = self.tagger.predict(images, tags=tags)
            return [{**p.to_dict(), "batch_size": len(images)} for p in preds]

    return CrashOnPoison


def test_an_upload_that_kills_its_replica_each_time_is_poison_and_its_batch_mates_are_tagged(
        ray_cluster, module_redis, tiny_checkpoint, tiny_rows):  # fmt: skip
    from ray import cloudpickle, serve

    from deploy.consumer import UploadConsumer
    from deploy.settings import ServeSettings

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    keys = Keys("p:")
    c = redis.Redis(port=module_redis.port)
    good = [enqueue(c, keys, i, image=tiny_rows[i % len(tiny_rows)]["image"]).decode() for i in range(30)]
    poison = enqueue(c, keys, 999, image=POISON).decode()
    good += [enqueue(c, keys, 100 + i, image=tiny_rows[i % len(tiny_rows)]["image"]).decode() for i in range(30)]
    s = ServeSettings(checkpoint=tiny_checkpoint, redis=module_redis.url, prefix=keys.prefix, metrics_port=0,
                      max_in_flight=16, max_batch_size=8, claim_idle_s=2, max_deliveries=3, model_timeout_s=60)
    app = UploadConsumer.options(num_replicas=1, ray_actor_options={"num_cpus": 0.25}).bind(
        crashing_model().options(ray_actor_options={"num_cpus": 0.5}).bind(tiny_checkpoint), asdict(s))
    serve.run(app, name="poison", route_prefix=None)
    try:
        wait_until_ended(c, keys, [*good, poison], timeout=400)
        results, dead = outcomes(c, keys)
        assert dead == {poison: b"poison"}, dead
        assert all(results[g] == 1 for g in good)
        [entry] = [e for _, e in c.xrange(keys.dead)]
        assert entry[b"attempts"] == b"3" and entry[b"post_id"] == b"999"
        assert c.xpending(keys.uploads, "danmul-taggers")["pending"] == 0
    finally:
        serve.delete("poison")


# -- property-based: whatever the fields, one outcome each ---------------------------------------------------
def _damaged(base: bytes, seed: int, which: int) -> bytes:
    return list(mutations(base, seed))[which % 4]


def upload_fields() -> st.SearchStrategy:
    """Stream entries as an attacker would write them: the protocol's fields with good, damaged or arbitrary
    values, any of them missing, and arbitrary extra fields."""
    bases = [data for data, _ in small_corpus().values()]
    text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60)
    images = st.one_of(st.sampled_from(bases), st.builds(_damaged, st.sampled_from(bases), st.integers(0, 2**31),
                                                         st.integers(0, 3)), st.binary(max_size=300))  # fmt: skip
    post_ids = st.one_of(st.integers(0, 2**63 - 1).map(str), st.integers(-(2**70), 2**70).map(str), text,
                         st.binary(max_size=30))  # fmt: skip
    uris = st.one_of(st.sampled_from(["s3://nope/x.jpg", "s3://", "/etc/passwd", "file:///dev/zero", "http://[::1]/",
                                      "gopher://x", "s3://b/../c/d.jpg"]), text)  # fmt: skip
    tags = st.one_of(text, st.binary(max_size=60), st.lists(st.sampled_from(["1girl", "solo", "smile"])).map(" ".join))
    protocol = st.fixed_dictionaries({}, optional={"post_id": post_ids, "image": images, "image_uri": uris,
                                                   "tags": tags})  # fmt: skip
    extra = st.dictionaries(st.binary(min_size=1, max_size=20), st.binary(max_size=50), max_size=5)
    return st.builds(lambda base, more: {**more, **base} or {"x": b""}, protocol, extra)


@pytest.fixture(scope="module")
def property_app(ray_cluster, module_redis, tiny_checkpoint, tmp_path_factory):
    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings

    root = tmp_path_factory.mktemp("roots")
    deploy(ServeSettings(checkpoint=tiny_checkpoint, redis=module_redis.url, prefix="prop:", http_port=HTTP_PORT,
                         metrics_port=free_port(), local_roots=str(root), claim_idle_s=5))
    yield replicas("TaggerModel")
    undeploy()


@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(st.lists(upload_fields(), min_size=5, max_size=25))
def test_any_entry_ends_in_one_result_or_one_dead_letter_with_a_known_reason(property_app, module_redis, entries):
    keys = Keys("prop:")
    c = redis.Redis(port=module_redis.port)
    ids = [c.xadd(keys.uploads, fields).decode() for fields in entries]
    wait_until_ended(c, keys, ids, timeout=120)
    results, dead = outcomes(c, keys)
    for i in ids:
        assert results[i] + (i in dead) == 1, i
        assert i in results or dead[i].decode() in known_reasons(), dead[i]
    assert replicas("TaggerModel") == property_app  # no model replica died
    assert c.xpending(keys.uploads, "danmul-taggers")["pending"] == 0



# -- CPU bombs: the progressive JPEGs among good uploads, and a cancelled call's decode -----------------
def test_cpu_bombs_are_dead_lettered_while_good_uploads_and_calls_go_on(ray_cluster, module_redis, tiny_checkpoint,
                                                                         tiny_rows):  # fmt: skip
    """Issue 23's case: two 1.3 MB progressive JPEGs of 40,000 tiny scans (each ~40 s of libjpeg's time at
    16 Mpx, and their decodes used to run on after the consumer gave up) among 20 good uploads: the bombs
    end as ``too_complex`` dead letters, every good upload is tagged, and /v1/tag and /health answer."""
    import requests
    from hostile_images import repeated_scan_jpeg

    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings

    keys = Keys("bomb:")
    c = redis.Redis(port=module_redis.port)
    bomb = repeated_scan_jpeg(40_000)
    bombs = [enqueue(c, keys, 900 + i, image=bomb).decode() for i in range(2)]
    good = [enqueue(c, keys, i, image=tiny_rows[i % len(tiny_rows)]["image"]).decode() for i in range(20)]
    s = ServeSettings(checkpoint=tiny_checkpoint, redis=module_redis.url, prefix=keys.prefix, http_port=HTTP_PORT,
                      metrics_port=free_port(), claim_idle_s=3)  # fmt: skip
    deploy(s)
    try:
        base = f"http://127.0.0.1:{HTTP_PORT}"
        tagged = requests.post(f"{base}/v1/tag", data=tiny_rows[0]["image"], timeout=60)
        refused = requests.post(f"{base}/v1/tag", data=bomb, timeout=60)
        wait_until_ended(c, keys, [*bombs, *good])
        results, dead = outcomes(c, keys)
        assert dead == {b: b"too_complex" for b in bombs}, dead
        assert all(results[g] == 1 for g in good)
        assert tagged.status_code == 200 and tagged.json()["characters"] is not None, tagged.text
        assert refused.status_code == 422 and refused.json()["error"] == "too_complex", refused.text
        assert requests.get(f"{base}/health", timeout=30).json()["status"] == "ok"
        [entry] = [e for _, e in c.xrange(keys.dead, count=1)]
        assert b"JPEG scans" in entry[b"detail"]
    finally:
        undeploy()


def spinning_decoder():
    """A deployment that decodes nothing but the decode pool's test job (it burns CPU until stopped), to
    see what a cancelled Serve request does to the worker doing it."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=8)
    class Spinner:
        def __init__(self):
            from model.decode_pool import DecodePool

            self.pool = DecodePool(1, cpu_s=3600, wall_s=3600)  # no budget would stop it for an hour

        def pids(self) -> list[int]:
            return self.pool.pids()

        async def spin(self) -> None:
            from model.decode_pool import SPIN

            await self.pool._run_async(SPIN, b"")

        async def check(self, data: bytes) -> tuple[int, int]:
            return await self.pool.check_async(data)

    return Spinner


def test_a_serve_request_its_caller_cancels_kills_the_decode_worker_doing_it(ray_cluster, tiny_rows):
    from ray import cloudpickle, serve

    from model.preprocess import declared_size

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    handle = serve.run(spinning_decoder().options(ray_actor_options={"num_cpus": 0.25}).bind(), name="spin",
                       route_prefix=None)  # fmt: skip
    try:
        [pid] = handle.pids.remote().result(timeout_s=60)
        call = handle.spin.remote()
        busy = time.monotonic() + 60
        while cpu_ticks(pid) < 50:  # the worker is spinning on the request (half a second of CPU)
            assert time.monotonic() < busy, "the worker never spun"
            time.sleep(0.1)
        call.cancel()
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}"):  # killed and reaped: long before an hour's budget
            assert time.monotonic() < deadline, "the worker outlived its cancelled request"
            time.sleep(0.1)
        image = tiny_rows[0]["image"]
        assert handle.check.remote(image).result(timeout_s=60) == declared_size(image)  # by a fresh worker
        assert handle.pids.remote().result(timeout_s=60) not in ([], [pid])
    finally:
        serve.delete("spin")


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process, in clock ticks (usually 100 a second); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])
