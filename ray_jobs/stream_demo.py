"""Step 3 of the demo: the streaming tagger on a local Redis, fed test-split uploads the way a platform
would add them (half with their tags, half image-only, a few broken on purpose), with a report of
what came out: how many were tagged, streamed accuracy against the true characters, the dead letters
and their reasons, throughput and latency."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np


def run_stream_demo(checkpoint: str, data_uri: str, redis_url: str, uploads: int = 300,
                    timeout_s: float = 600) -> dict:
    import redis

    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings
    from ingest.queue import Keys, enqueue, entry_ms
    from ingest.shards import iter_examples
    from ingest.storage import Storage
    from ray_jobs.local_ray import ensure_ray
    from ray_jobs.local_redis import free_port
    from ray_jobs.stream import cpus_needed, latencies_s

    rows = [r for _, r in zip(range(uploads), iter_examples(Storage(data_uri), "test"), strict=False)]
    s = ServeSettings(checkpoint=checkpoint, redis=redis_url, http_port=free_port(), metrics_port=free_port())
    ensure_ray(None, cpus_needed(s))
    t0 = time.perf_counter()
    deploy(s)
    print(f"streaming tagger deployed in {time.perf_counter() - t0:.1f} s (1 consumer, 1 model replica); "
          f"metrics on http://127.0.0.1:{s.metrics_port}/metrics, API on http://127.0.0.1:{s.http_port}/",
          flush=True)  # fmt: skip
    keys = Keys()
    c = redis.Redis.from_url(redis_url)
    try:
        truth, with_tags = {}, set()
        pipe = c.pipeline(transaction=False)
        for i, r in enumerate(rows):
            tags = r["tags"] if i % 2 == 0 else None
            enqueue(pipe, keys, r["post_id"], image=r["image"], tags=tags)
            truth[r["post_id"]] = r["character"]
            if tags:
                with_tags.add(r["post_id"])
        broken = [  # what a platform's uploads really contain now and then
            dict(post_id=9_000_001, image=rows[0]["image"][: len(rows[0]["image"]) // 3]),
            dict(post_id=9_000_002, image=b"<html>not an image</html>"),
            dict(post_id=None, image=rows[1]["image"]),
            dict(post_id=9_000_003, image=rows[2]["image"], tags="x" * 500),
            dict(post_id=9_000_004, image_uri="/etc/passwd"),
        ]
        for b in broken:
            enqueue(pipe, keys, **b)
        pipe.execute()
        total = len(rows) + len(broken)
        print(f"enqueued {len(rows)} test-split uploads ({len(with_tags)} with their tags) and {len(broken)} "
              "broken ones on danmul:uploads", flush=True)
        deadline = time.monotonic() + timeout_s
        while c.xlen(keys.results) + c.xlen(keys.dead) < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{c.xlen(keys.results)} results + {c.xlen(keys.dead)} dead letters of {total}")
            time.sleep(0.2)
        results = c.xrange(keys.results)
        dead = c.xrange(keys.dead)
    finally:
        undeploy()
    correct = Counter()
    for _, e in results:
        post = int(e[b"post_id"])
        group = "with tags" if post in with_tags else "image only"
        correct[group, "n"] += 1
        correct[group, "ok"] += e[b"character"].decode() == truth.get(post)
        correct[group, "abstained"] += e.get(b"abstained") == b"1"
    stamps = [entry_ms(eid) for eid, _ in results]
    latency = np.array(latencies_s(results))
    rate = (len(stamps) - 1) / max(1e-3, (stamps[-1] - stamps[0]) / 1000)
    print(f"\ntagged {len(results)} of {len(rows)} good uploads; {len(dead)} dead letters of {len(broken)} broken")
    for group in ("image only", "with tags"):
        n = correct[group, "n"]
        if n:
            answered = n - correct[group, "abstained"]
            precision = correct[group, "ok"] / answered if answered else 0.0
            print(f"  streamed, {group} ({n} uploads): answered {answered / n:.0%} (coverage at the calibrated "
                  f"thresholds), {precision:.0%} of the answers right (precision), {correct[group, 'ok'] / n:.0%} "
                  "of all uploads named right")
    for _, e in dead:
        print(f"  dead letter: post_id={e[b'post_id'].decode() or '-'} reason={e[b'reason'].decode()} "
              f"{e[b'detail'].decode()[:70]}")
    print(f"throughput {rate:,.0f} uploads/s (a backlog, first to last result); end-to-end latency "
          f"p50 {np.percentile(latency, 50) * 1000:,.0f} ms, p99 {np.percentile(latency, 99) * 1000:,.0f} ms "
          "(from enqueue, so it includes waiting in the backlog)")
    if len(results) != len(rows) or len(dead) != len(broken):
        raise RuntimeError("some uploads were lost or duplicated")
    return {"tagged": len(results), "dead": len(dead), "uploads_per_s": rate}
