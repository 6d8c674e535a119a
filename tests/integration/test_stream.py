"""The streaming tagger for real: a redis-server started here, the S3 API from moto's server mode, a local
Ray with Ray Serve on CPU, a tiny model. Uploads go in with XADD as a platform would add them; the
tests count what comes out: one result per good upload, one dead letter per bad one, nothing pending,
also when a consumer or a model replica is killed mid-stream or Redis restarts."""

from __future__ import annotations

import contextlib
import io
import time
import urllib.request
from collections import Counter

import boto3
import pytest
import redis
import requests
from PIL import Image

from ingest.queue import Keys, enqueue, read_result
from model.tagger import Tagger
from ray_jobs.local_redis import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEYS = Keys()
HTTP_PORT = free_port()


@contextlib.contextmanager
def running(settings):
    from deploy.app import deploy, undeploy

    deploy(settings)
    try:
        yield
    finally:
        undeploy()


def settings(checkpoint, redis_url, **kw):
    from deploy.settings import ServeSettings

    return ServeSettings(checkpoint=checkpoint, redis=redis_url, http_port=HTTP_PORT, metrics_port=free_port(),
                         **kw)


def wait_for(client: redis.Redis, total: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.xlen(KEYS.results) + client.xlen(KEYS.dead) >= total:
                time.sleep(1.0)  # anything extra (a duplicate) would show up now
                return
        except redis.ConnectionError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"only {client.xlen(KEYS.results)} results + {client.xlen(KEYS.dead)} dead of {total}")


def assert_exactly_once(client: redis.Redis, good: set[int], dead: int = 0) -> None:
    posts = [int(e[b"post_id"]) for _, e in client.xrange(KEYS.results)]
    assert len(posts) == len(good), f"{len(posts)} results for {len(good)} uploads"
    assert set(posts) == good  # so no post twice, none missing
    assert all(client.exists(KEYS.result(p)) for p in good)
    assert client.xlen(KEYS.dead) == dead
    [group] = client.xinfo_groups(KEYS.uploads)
    assert group["pending"] == 0 and group["lag"] == 0


def metric_values(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("danmul_")}


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_500_uploads_with_bad_ones_give_one_outcome_each(ray_cluster, tiny_checkpoint, tiny_rows, s3_bucket,
                                                          tmp_path, redis_server):
    server = redis_server
    bucket = s3_bucket[len("s3://"):]
    s3 = boto3.client("s3")
    root = tmp_path / "uploads"
    root.mkdir()
    s3.put_object(Bucket=bucket, Key="bad/text.jpg", Body=b"this is not an image")
    s3.put_object(Bucket=bucket, Key="bad/empty.jpg", Body=b"")
    s3.put_object(Bucket=bucket, Key="bad/huge.jpg", Body=b"\xff" * ((32 << 20) + 10))
    s3.put_object(Bucket=bucket, Key="bad/bomb.png", Body=encoded(Image.new("1", (9000, 6000)), "PNG"))
    truncated = tiny_rows[0]["image"][: len(tiny_rows[0]["image"]) // 2]

    c = redis.Redis(port=server.port)
    good: dict[int, list[str] | None] = {}
    for i in range(450):
        row = tiny_rows[i % len(tiny_rows)]
        post_id, tags = 10_000 + i, (row["tags"] if i % 2 else None)
        good[post_id] = tags
        if i % 3 == 0:
            enqueue(c, KEYS, post_id, image=row["image"], tags=tags)
        elif i % 3 == 1:
            s3.put_object(Bucket=bucket, Key=f"img/{post_id}.jpg", Body=row["image"])
            enqueue(c, KEYS, post_id, image_uri=f"{s3_bucket}/img/{post_id}.jpg", tags=tags)
        else:
            (root / f"{post_id}.jpg").write_bytes(row["image"])
            enqueue(c, KEYS, post_id, image_uri=str(root / f"{post_id}.jpg"), tags=tags)
    bad = [
        *[("not_found", dict(image_uri=f"{s3_bucket}/img/missing-{i}.jpg")) for i in range(6)],
        *[("truncated", dict(image=truncated)) for _ in range(6)],
        *[("not_an_image", dict(image_uri=f"{s3_bucket}/bad/text.jpg")) for _ in range(6)],
        *[("decompression_bomb", dict(image_uri=f"{s3_bucket}/bad/bomb.png")) for _ in range(5)],
        *[("too_large", dict(image_uri=f"{s3_bucket}/bad/huge.jpg")) for _ in range(3)],
        *[("empty", dict(image_uri=f"{s3_bucket}/bad/empty.jpg")) for _ in range(4)],
        *[("missing_image", dict()) for _ in range(5)],
        *[("bad_tags", dict(image=tiny_rows[1]["image"], tags="x" * 300)) for _ in range(5)],
        *[("forbidden_path", dict(image_uri=str(tmp_path / "outside.jpg"))) for _ in range(5)],
    ]
    for i, (_, kw) in enumerate(bad):
        enqueue(c, KEYS, 90_000 + i, **kw)
    for _ in range(5):
        enqueue(c, KEYS, None, image=tiny_rows[2]["image"])  # no post_id
    expected_dead = Counter(r for r, _ in bad) + Counter({"missing_post_id": 5})
    assert sum(expected_dead.values()) == 50

    s = settings(tiny_checkpoint, server.url, local_roots=str(root), allowed_buckets=bucket, consumers=1,
                 max_in_flight=32)
    with running(s):
        wait_for(c, 500)
        assert_exactly_once(c, set(good), dead=50)
        dead = [e for _, e in c.xrange(KEYS.dead)]
        assert Counter(e[b"reason"].decode() for e in dead) == expected_dead
        assert all(e[b"detail"] or e[b"reason"] in (b"missing_image", b"missing_post_id") for e in dead)
        # the streamed results are the model's: the same as Tagger.predict with the same tags
        tagger = Tagger.from_checkpoint(tiny_checkpoint)
        for post_id in list(good)[:24]:
            i = post_id - 10_000
            [want] = tagger.predict([tiny_rows[i % len(tiny_rows)]["image"]], tags=[good[post_id]])
            got = read_result(c, KEYS, post_id)
            assert [n for n, _ in got["characters"]] == [n for n, _ in want.characters]
            assert abs(got["characters"][0][1] - want.characters[0][1]) < 1e-4
            assert set(got["tags"]) == set(want.tags)
        m = metric_values(s.metrics_port)
        assert m['danmul_uploads_total{outcome="tagged"}'] == 450
        assert m['danmul_uploads_total{outcome="dead_letter"}'] == 50
        for reason, n in expected_dead.items():
            assert m[f'danmul_dead_letters_total{{reason="{reason}"}}'] == n
        assert m["danmul_end_to_end_seconds_count"] == 500
        assert m['danmul_stage_seconds_count{stage="inference"}'] == 450
        assert m["danmul_batch_size_sum"] == 450 and m["danmul_batch_size_count"] < 450  # batches formed
        assert m['danmul_queue_pending{group="danmul-taggers"}'] >= 0


def kill_one(deployment: str) -> None:
    import ray

    [victim, *_] = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)


def enqueue_good(c: redis.Redis, rows, n: int) -> set[int]:
    pipe = c.pipeline(transaction=False)
    for i in range(n):
        enqueue(pipe, KEYS, 20_000 + i, image=rows[i % len(rows)]["image"], tags=rows[i % len(rows)]["tags"])
    pipe.execute()
    return {20_000 + i for i in range(n)}


def disrupt_mid_stream(c: redis.Redis, rows, n: int, after: int, disrupt) -> None:
    """Enqueue ``n`` good uploads, ``disrupt()`` once ``after`` results are in, then require exactly one
    result per upload and nothing pending."""
    posts = enqueue_good(c, rows, n)
    while c.xlen(KEYS.results) < after:
        time.sleep(0.05)
    disrupt()
    at_disruption = c.xlen(KEYS.results)
    wait_for(c, n)
    assert at_disruption < n  # it really happened mid-stream
    assert_exactly_once(c, posts)


def test_killed_consumer_and_model_replica_lose_and_duplicate_nothing(ray_cluster, tiny_checkpoint, tiny_rows,
                                                                      redis_server):
    s = settings(tiny_checkpoint, redis_server.url, consumers=2, min_replicas=2, max_replicas=2, replica_cpus=0.5,
                 claim_idle_s=3, max_in_flight=16)

    def kill() -> None:
        kill_one("UploadConsumer")
        kill_one("TaggerModel")

    with running(s):
        disrupt_mid_stream(redis.Redis(port=redis_server.port), tiny_rows, 400, 60, kill)


def test_redis_restart_mid_stream(ray_cluster, tiny_checkpoint, tiny_rows, redis_server):
    def restart() -> None:
        redis_server.stop()  # SIGTERM with the append-only file on: the streams survive the restart
        time.sleep(3)
        redis_server.start()

    # uploads whose result could not be written while Redis was down stay pending until reclaimed: after
    # claim_idle_s (3 s here, as in the test above; the default 60 s would only make this test wait)
    with running(settings(tiny_checkpoint, redis_server.url, consumers=1, max_in_flight=16, claim_idle_s=3)):
        disrupt_mid_stream(redis.Redis(port=redis_server.port), tiny_rows, 300, 50, restart)


def test_http_evaluate_like_danbooru_and_v1_tag(ray_cluster, tiny_checkpoint, tiny_rows, redis_server):
    server = redis_server
    s = settings(tiny_checkpoint, server.url, max_request_bytes=300_000)
    base = f"http://127.0.0.1:{HTTP_PORT}"
    tagger = Tagger.from_checkpoint(tiny_checkpoint)
    with running(s):
        health = requests.get(f"{base}/health", timeout=30).json()
        assert health["status"] == "ok" and health["model"] == tagger.version

        # Danbooru's autotagger client: multipart "file", threshold, format=json
        a, b = tiny_rows[0]["image"], tiny_rows[1]["image"]
        r = requests.post(f"{base}/evaluate", timeout=60, data={"threshold": "0.01", "format": "json"},
                          files=[("file", ("a.jpg", a, "image/jpeg")), ("file", ("b.jpg", b, "image/jpeg")),
                                 ("file", ("c.jpg", b"not an image", "image/jpeg"))])
        assert r.status_code == 200, r.text
        out = r.json()
        assert [o["filename"] for o in out] == ["a.jpg", "b.jpg", "c.jpg"]
        [want] = tagger.predict([a])
        scores = out[0]["tags"]
        assert want.best_character[0] in scores  # the character tag is included
        assert abs(scores[want.best_character[0]] - want.best_character[1]) < 1e-4
        assert next(iter(scores)) == want.best_character[0] and len(scores) <= 50  # characters come first
        general = [v for k, v in scores.items() if k not in tagger.labels.characters]
        assert general == sorted(general, reverse=True) and len(general) > 0
        assert all(v >= 0.01 for v in scores.values())
        assert out[2]["tags"] == {} and out[2]["error"] == "not_an_image"
        limited = requests.post(f"{base}/evaluate", timeout=60, data={"threshold": "0", "limit": "3"},
                                files={"file": ("a.jpg", a)}).json()
        assert len(limited[0]["tags"]) == 3

        # /v1/tag: raw body with tags in the query, or multipart
        r = requests.post(f"{base}/v1/tag", params={"tags": " ".join(tiny_rows[0]["tags"])}, data=a,
                          headers={"content-type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        [want] = tagger.predict([a], tags=[tiny_rows[0]["tags"]])
        body = r.json()
        assert body["model"] == tagger.version and set(body["tags"]) == set(want.tags)
        assert [n for n, _ in body["characters"]] == [n for n, _ in want.characters]
        r = requests.post(f"{base}/v1/tag", files={"file": ("x.png", b"\x89PNG\r\n\x1a\nbroken")}, timeout=60)
        assert r.status_code == 422 and ("truncated" in r.text or "not_an_image" in r.text)
        # bodies over the limit are refused before they are read; no file is a client error
        r = requests.post(f"{base}/v1/tag", data=b"\0" * 400_000, headers={"content-type": "image/jpeg"},
                          timeout=60)
        assert r.status_code == 413
        assert requests.post(f"{base}/evaluate", data={"threshold": "0.1"}, timeout=60).status_code == 400
        m = metric_values(s.metrics_port)
        assert m['danmul_http_requests_total{code="200",endpoint="evaluate"}'] == 2
        assert m['danmul_http_requests_total{code="413",endpoint="v1_tag"}'] == 1


def test_new_user_config_changes_thresholds_and_batching(ray_cluster, tiny_checkpoint, tiny_rows, redis_server):
    from ray import serve

    from deploy.app import deploy

    image, tags = tiny_rows[0]["image"], tiny_rows[0]["tags"]
    s = settings(tiny_checkpoint, redis_server.url)
    with running(s):
        model = serve.get_deployment_handle("TaggerModel", app_name="danmul")
        calibrated = model.tag.remote(image, tags).result()
        [want] = Tagger.from_checkpoint(tiny_checkpoint).predict([image], tags=[tags])
        assert set(calibrated["tags"]) == set(want.tags)
        s.tag_threshold, s.character_threshold, s.top_k, s.max_batch_size = 0.0, 1.01, 3, 4
        deploy(s)  # the same application with a new user_config
        info = model.info.remote().result()
        changed = [r.result() for r in [model.tag.remote(image, tags) for _ in range(12)]]
    assert all(len(c["tags"]) == info["tags"] for c in changed)  # threshold 0: every tag
    assert all(c["characters"] == [] and c["abstained"] for c in changed)  # threshold above 1: abstains
    assert changed[0]["best_character"][0] == want.best_character[0]
    assert max(c["batch_size"] for c in changed) <= 4  # the new batch limit
