"""``danmul demo`` / ``make demo``: the whole system end to end on one machine, on embedded defaults.

Each step says what it is doing; a failing step is named, with its reason, and the exit is non-zero.
With ``--keep-serving`` the streaming tagger stays up at the end (HTTP API on port 8000, metrics on
9500, a local redis-server) until Ctrl-C. Steps: the demo generates a synthetic Dan:mul dataset, trains the tiny
model with Ray Train (2 workers) and the curriculum, evaluates it image-only and with tags, exports a
calibrated checkpoint, and streams test-split uploads (some broken on purpose) through the streaming
tagger on a redis-server of its own, and backfills the test split as an archive of image files.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class DemoSettings:
    characters: int = 24
    images: int = 2400
    image_size: int = 64
    epochs: int = 20  # 600 steps of 64 images: about 3.5 minutes on 2 cores
    uploads: int = 300

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(characters=8, images=240, image_size=32, epochs=2, uploads=60)


class StepFailed(RuntimeError):
    pass


def _step(n: int, title: str, fn: Callable[[], None]) -> None:
    print(f"\n== step {n}: {title}", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        raise StepFailed(f"step {n} ({title}) failed: {type(e).__name__}: {e}") from e
    print(f"-- step {n} done in {time.perf_counter() - t0:.1f} s", flush=True)


def run_demo(out: str, quick: bool = False, keep_serving: bool = False) -> int:
    from ingest.stats import format_stats
    from ingest.synth import SynthConfig, synthesize

    settings = DemoSettings.quick() if quick else DemoSettings()
    out = os.path.abspath(out)
    data_uri = os.path.join(out, "data")

    def synth() -> None:
        cfg = SynthConfig(
            out=data_uri,
            characters=settings.characters,
            images=settings.images,
            image_size=settings.image_size,
            overwrite=True,
        )
        print(f"generating {cfg.images:,} images of {cfg.characters} characters at {cfg.image_size}px "
              f"into {data_uri}", flush=True)
        info = synthesize(cfg)
        print(format_stats(info))

    runs = os.path.join(out, "runs")
    model_dir = os.path.join(runs, "demo", "model")

    def train() -> None:
        from ingest.storage import Storage
        from ray_jobs.train import TrainConfig, run

        Storage(runs).delete_prefix("demo")  # a fresh run, not a resume of an earlier demo
        cfg = TrainConfig(data=data_uri, out=runs, name="demo", epochs=settings.epochs, workers=2,
                          image_size=settings.image_size, batch_size=32)
        print(f"danmul train: tiny preset, 2 Ray Train workers, {cfg.epochs} epochs, curriculum "
              f"{cfg.curriculum} (up to {cfg.max_drop:.0%} of samples without tags)", flush=True)
        run(cfg, log=lambda line: print(line, flush=True))

    def stream() -> None:
        from ray_jobs.local_redis import RedisServer
        from ray_jobs.stream_demo import run_stream_demo

        folder = os.path.join(out, "redis")
        os.makedirs(folder, exist_ok=True)
        with RedisServer(folder) as server:
            print(f"redis-server on {server.url} (append-only file in {folder})", flush=True)
            run_stream_demo(model_dir, data_uri, server.url, uploads=settings.uploads)

    def backfill() -> None:
        from ingest.shards import iter_examples
        from ingest.storage import Storage
        from ray_jobs.backfill import BackfillConfig, read_results, run

        archive = os.path.join(out, "archive")
        Storage(out).delete_prefix("archive")
        Storage(out).delete_prefix("backfill")
        truth = {}
        for r in iter_examples(Storage(data_uri), "test"):
            Storage(archive).write_bytes(f"{r['post_id'] % 100:02d}/{r['post_id']}.jpg", r["image"])
            truth[r["post_id"]] = r["character"]
        Storage(archive).write_bytes("99/999999999.jpg", b"this archive has a broken file too")
        print(f"wrote the test split as an archive of {len(truth) + 1} image files under {archive}", flush=True)
        cfg = BackfillConfig(input=archive, checkpoint=model_dir, out=os.path.join(out, "backfill"), progress=False)
        result = run(cfg, log=lambda line: print(line, flush=True))
        results, errors = read_results(cfg.out)
        named = [(r["post_id"], r["characters"][0]["name"]) for r in results.to_pylist() if r["characters"]]
        correct = sum(truth.get(p) == name for p, name in named)
        reasons = ", ".join(errors.column("reason").to_pylist())
        total = max(1, len(truth))
        print(f"backfill: {result.processed} tagged, {result.errors} error(s) ({reasons}); image-only: answered "
              f"{len(named) / total:.0%}, {correct / max(1, len(named)):.0%} of the answers right, "
              f"{correct / total:.0%} of all images named right; {result.images_per_s:,.0f} images/s including "
              f"start-up; results in {cfg.out}/results/*.parquet")

    def finish(keep: bool) -> None:
        import ray

        if not keep:
            ray.shutdown()
            print("Ray and redis-server stopped; nothing the demo started is left running. The streaming tagger "
                  "served its metrics on the port printed in step 3 while it ran; `danmul demo --keep-serving` "
                  f"keeps it up, or run it yourself: danmul serve --checkpoint {model_dir} --redis URL", flush=True)
            return
        from ray import serve

        from deploy.settings import ServeSettings
        from ray_jobs.local_redis import RedisServer
        from ray_jobs.stream import serve_forever

        serve.shutdown()  # step 3's Serve listened on a free port; this one listens on 8000
        with RedisServer(os.path.join(out, "redis")) as server:
            s = ServeSettings(checkpoint=model_dir, redis=server.url, metrics_port=9500, http_port=8000)
            print(f"redis-server {server.url}: add uploads with\n  danmul enqueue --redis {server.url} "
                  f"--data {data_uri} --split test --limit 50\nor redis-cli -p {server.port} XADD danmul:uploads '*' "
                  "post_id 1 image_uri /path/to/img.jpg  (local paths need --local-roots)", flush=True)
            serve_forever(s, log=lambda line: print(line, flush=True))

    try:
        _step(1, "generate a synthetic Dan:mul dataset", synth)
        _step(2, "train the tiny multimodal model with Ray Train and curriculum learning, evaluate, export",
              train)
        _step(3, "stream test-split uploads through the streaming tagger (Redis -> Ray Serve -> Redis)", stream)
        _step(4, "backfill the test split as an archive with Ray Data (results as Parquet)", backfill)
        _step(5, "keep serving until Ctrl-C" if keep_serving else "shut down", lambda: finish(keep_serving))
    except StepFailed as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    finally:
        import ray

        ray.shutdown()
    print(f"\ndemo finished; everything is under {out}")
    return 0
