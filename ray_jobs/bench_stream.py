"""``danmul bench stream``: the streaming tagger against the bare model, on one machine in one run.

  A. the bare model: ``Tagger.predict`` on batches of the same encoded images (decode + preprocess +
     inference in one process), the ceiling;
  B. the whole pipeline: uploads (inline image bytes, half with tags) pre-loaded into Redis, read by
     the consumer group, batched on a model replica, results and acknowledgements written back;
     uploads/s between the first and the last result;
  C. latency at about half of B: uploads added at a steady 0.5 x B for ``latency_s`` seconds;
     end-to-end p50/p99 from each upload's stream timestamp to its result's (both Redis clocks).

Reports B/A (goal >= 0.85) and C's percentiles (goal p99 < 2 s with the tiny preset on CPU).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def bare_model(checkpoint: str, images: list[bytes], tags: list, batch: int, seconds: float = 10.0) -> float:
    from model.tagger import Tagger

    tagger = Tagger.from_checkpoint(checkpoint, batch_size=batch)
    tagger.predict(images[:batch], tags[:batch])  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(images), batch):
            tagger.predict(images[i : i + batch], tags[i : i + batch])
            done += len(images[i : i + batch])
    return done / (time.perf_counter() - t0)


def main(uploads: int = 3000, image_size: int = 64, max_batch_size: int = 32, latency_s: float = 20.0,
         consumers: int = 1, replica_cpus: float = 0) -> int:
    import ray
    import redis

    from deploy.settings import ServeSettings
    from ingest.queue import Keys, enqueue, entry_ms
    from ray_jobs.local_ray import ensure_ray
    from ray_jobs.local_redis import RedisServer, free_port
    from ray_jobs.samples import rows as all_rows
    from ray_jobs.samples import synthetic_dataset, untrained_checkpoint
    from ray_jobs.stream import cpus_needed, latencies_s

    root = tempfile.mkdtemp(prefix="danmul-bench-stream-")
    data = os.path.join(root, "data")
    synthetic_dataset(data, characters=24, images=600, image_size=image_size)
    rows = all_rows(data)
    images = [r["image"] for r in rows]
    tags = [r["tags"] if i % 2 else None for i, r in enumerate(rows)]
    # throughput does not depend on the weights
    ckpt = untrained_checkpoint(data, os.path.join(root, "model"), image_size)

    import torch

    bare = bare_model(ckpt, images, tags, max_batch_size)
    print(f"A. bare Tagger.predict, batches of {max_batch_size}: {bare:,.0f} images/s", flush=True)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(replica_cpus or 1)))  # what the model replica gets
    bare_replica = bare_model(ckpt, images, tags, max_batch_size)
    torch.set_num_threads(default_threads)

    cores = os.cpu_count() or 1
    s = ServeSettings(checkpoint=ckpt, consumers=consumers, max_batch_size=max_batch_size,
                      replica_cpus=replica_cpus or 1.0, http_port=free_port(), metrics_port=free_port(),
                      max_in_flight=4 * max_batch_size)  # fmt: skip
    keys = Keys()
    with RedisServer(root) as server:
        s.redis = server.url
        c = redis.Redis(port=server.port)
        pipe = c.pipeline(transaction=False)
        for i in range(uploads):
            enqueue(pipe, keys, i, image=images[i % len(images)], tags=tags[i % len(tags)])
        pipe.execute()
        ensure_ray(None, cpus_needed(s))
        from deploy.app import deploy, undeploy

        try:
            deploy(s)
            while c.xlen(keys.results) + c.xlen(keys.dead) < uploads:
                time.sleep(0.2)
            stamps = [entry_ms(eid) for eid, _ in c.xrange(keys.results)]
            # the first results include start-up (the model's first batches); count from the 5th percentile
            start = stamps[len(stamps) // 20]
            piped = (len(stamps) - len(stamps) // 20 - 1) / max(1e-3, (stamps[-1] - start) / 1000)
            print(f"B. pipeline (Redis -> consumer -> batched replica -> Redis): {piped:,.0f} uploads/s", flush=True)

            # C. steady load at half of B
            rate = piped / 2
            c.delete(keys.results)
            n = int(rate * latency_s)
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                enqueue(c, keys, 1_000_000 + i, image=images[i % len(images)], tags=tags[i % len(tags)])
            while c.xlen(keys.results) < n:
                time.sleep(0.2)
            lat = np.array(latencies_s(c.xrange(keys.results)))
        finally:
            undeploy()
            ray.shutdown()
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    print(f"\ntiny preset at {image_size}px, {cores} CPU cores, {consumers} consumer(s), 1 model replica, "
          f"max batch {max_batch_size}, {uploads:,} uploads (half with tags):\n")
    print("| what | figure |\n|---|---|")
    print(f"| A. bare `Tagger.predict` loop | {bare:,.0f} images/s |")
    print(f"| B. whole pipeline | {piped:,.0f} uploads/s |")
    print(f"| B / A | {piped / bare:.2f} (goal: at least 0.85) |")
    print(f"| A'. bare loop with the replica's {max(1, int(replica_cpus or 1))} torch thread(s) | "
          f"{bare_replica:,.0f} images/s |")
    print(f"| B / A' | {piped / bare_replica:.2f} |")
    print(f"| C. end-to-end latency at {rate:,.0f} uploads/s (half of B), {n:,} uploads | p50 {p50 * 1000:,.0f} ms, "
          f"p99 {p99 * 1000:,.0f} ms (goal: p99 under 2 s) |")
    return 0
