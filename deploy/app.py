"""The streaming tagger as one Ray Serve application: queue consumers, batched model replicas, HTTP API.

    Redis uploads ──XREADGROUP──> UploadConsumer (N, one per node is typical)
                                    │ fetch (object storage / allowed local root / inline bytes)
                                    ▼
                                  TaggerModel (autoscaled; a GPU each when the cluster has GPUs)
                                    │ decode + preprocess per request, @serve.batch inference
                                    ▼
                                  UploadConsumer ──Lua: XACK + HSET result + XADD results──> Redis
    HTTP  POST /evaluate, POST /v1/tag, GET /health ──> TaggerAPI ──> TaggerModel

The consumer is where the exactly-once rule lives (see ``ingest.queue``): a result or dead letter is
written only together with the acknowledgement, and anything that fails for a reason that may pass
(storage trouble, a model replica dying, Redis restarting) is left pending for another delivery.
Thresholds, batch size and batch wait are ``user_config`` of the model deployment, applied in
``reconfigure`` (with a ``serve deploy`` config file Serve does that on running replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.settings import ServeSettings, metrics_dir

log = logging.getLogger("danmul.serve")

APP_NAME = "danmul"
RETRYABLE_MODEL_ATTEMPTS = 3  # a model call that fails (replica died) is retried this often before leaving
REDIS_WRITE_PATIENCE_S = 30.0  # how long a finished upload waits for Redis to come back before it is left


def _env(s: ServeSettings) -> dict[str, str]:
    env = {"PROMETHEUS_MULTIPROC_DIR": metrics_dir(s.metrics_port), "DANMUL_METRICS_PORT": str(s.metrics_port)}
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def start_metrics() -> Any:
    from deploy import metrics

    metrics.serve_node_metrics(int(os.environ.get("DANMUL_METRICS_PORT", "0")))
    return metrics


# -- model replicas --------------------------------------------------------------------------------------
@dataclass
class _Item:
    pixels: Any  # (3, S, S) tensor
    tags: list[str] | None
    top_k: int
    threshold: float | None


async def _done(value):
    return value


@serve.deployment
class TaggerModel:
    """``Tagger`` behind dynamic batching. ``tag(image_bytes, tags)`` decodes in a thread (the event loop
    keeps collecting requests) and joins a batch; a bad image comes back as ``{"error": reason}``."""

    def __init__(self, checkpoint: str, endpoint_url: str | None = None, device: str | None = None,
                 threads: int = 0):
        from ingest.storage import Storage
        from model.tagger import Tagger

        self.m = start_metrics()
        if threads:  # intra-op threads = the replica's CPUs: more would fight the consumers for the cores
            import torch

            torch.set_num_threads(threads)
        self.tagger = Tagger.from_checkpoint(Storage(checkpoint, endpoint_url), device=device)
        self.top_k = 5
        self.m.MODEL_INFO.labels(self.tagger.version, self.tagger.config.image_model).set(1)
        self.m.MODEL_REPLICAS.labels(self.tagger.version).set(1)
        log.info("model %s loaded on %s", self.tagger.version, self.tagger.device)

    def reconfigure(self, config: dict) -> None:
        """``user_config``: thresholds, top_k, batch size and wait; applied without a restart."""
        self.tagger.set_thresholds(config.get("tag_threshold"), config.get("character_threshold"))
        self.top_k = int(config.get("top_k", self.top_k))
        if "max_batch_size" in config:
            self._infer.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self._infer.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    def info(self) -> dict:
        cfg = self.tagger.config
        return {"model": self.tagger.version, "pid": os.getpid(), "image_size": cfg.image_size,
                "image_model": cfg.image_model, "characters": len(self.tagger.labels.characters),
                "tags": len(self.tagger.labels.tags)}

    async def tag(self, image: bytes, tags: list[str] | None = None, threshold: float | None = None,
                  top_k: int | None = None) -> dict:
        """One image (the HTTP API)."""
        [out] = await self.tag_many([image], [tags], threshold, top_k)
        return out

    async def tag_many(self, images: list[bytes], tags: list[list[str] | None], threshold: float | None = None,
                       top_k: int | None = None) -> list[dict]:
        """Several images in one call (a consumer's group of uploads: one Ray call, not one per upload).
        Each image still joins the replica's dynamic batches on its own."""
        decoded = await asyncio.to_thread(self._decode_all, images)
        k = top_k or self.top_k
        return list(await asyncio.gather(*[
            _done(d) if isinstance(d, dict) else self._infer(_Item(d, t, k, threshold))
            for d, t in zip(decoded, tags, strict=True)
        ]))  # fmt: skip

    def _decode_all(self, images: list[bytes]) -> list:
        """Tensors, or ``{"error": reason}`` for what cannot be decoded (in a worker thread)."""
        from model.preprocess import ImageError

        out = []
        for image in images:
            t0 = time.perf_counter()
            try:
                out.append(self.tagger.preprocess(image))
            except ImageError as e:
                out.append({"error": e.reason, "detail": str(e)})
                continue
            self.m.STAGE_SECONDS.labels("decode").observe(time.perf_counter() - t0)
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _infer(self, items: list[_Item]) -> list[dict]:
        import torch

        t0 = time.perf_counter()
        pixels = torch.stack([i.pixels for i in items])  # (B, 3, S, S)
        # on the event loop itself: a worker thread here only added GIL hand-offs (measured no faster);
        # decoding still runs in threads, and the next batch forms when this one returns
        chars, tag_probs = self.tagger.scores(pixels, [i.tags for i in items])
        out = []
        for item, c, t in zip(items, chars, tag_probs, strict=True):
            out.append({**self.tagger.decode(c, t, item.top_k, item.threshold).to_dict(), "batch_size": len(items)})
        elapsed = time.perf_counter() - t0
        self.m.BATCH_SIZE.observe(len(items))
        for _ in items:
            self.m.STAGE_SECONDS.labels("inference").observe(elapsed)
        return out

    def __del__(self) -> None:
        if hasattr(self, "m"):
            self.m.process_exiting()


# -- queue consumers -------------------------------------------------------------------------------------
class CallBatcher:
    """Groups a consumer's model requests: up to ``size`` uploads (or what arrives within ``wait_s``) go
    to the model in one ``tag_many`` call. A Serve call costs the caller about a millisecond of CPU, as
    much as a tiny model's inference per image; one call per group keeps the consumer off the critical
    path. Several groups are in flight at once; the replica batches images across them."""

    def __init__(self, model: DeploymentHandle, size: int, wait_s: float = 0.005):
        self.model, self.size, self.wait_s = model, size, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.calls: set[asyncio.Task] = set()

    async def submit(self, image: bytes, tags: list[str] | None) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((image, tags, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(group) < self.size:
                try:
                    group.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            call = loop.create_task(self._call(group))
            self.calls.add(call)
            call.add_done_callback(self.calls.discard)

    async def _call(self, group: list) -> None:
        try:
            results = await self.model.tag_many.remote([g[0] for g in group], [g[1] for g in group])
        except Exception as e:  # the replica died, or none is ready: each upload decides what to do
            for _, _, fut in group:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, _, fut), result in zip(group, results, strict=True):
            if not fut.done():
                fut.set_result(result)


@serve.deployment
class UploadConsumer:
    """Reads uploads through the consumer group and sees each one to a result or a dead letter.

    At most ``max_in_flight`` uploads are held at once: the next ``XREADGROUP`` asks only for free slots,
    so a backlog of millions waits in Redis, not here. Every ``claim_idle_s / 2`` the consumer also
    reclaims uploads left pending by consumers that died (``XAUTOCLAIM``)."""

    def __init__(self, model: DeploymentHandle, settings: dict):
        from ingest.fetch import ImageFetcher
        from ingest.queue import AsyncUploadQueue, Keys, connect

        self.s = ServeSettings(**settings)
        self.m = start_metrics()
        self.model = model
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.client = connect(self.s.redis, asyncio=True, socket_timeout=30.0)
        self.queue = AsyncUploadQueue(self.client, Keys(self.s.prefix), self.s.group, self.name,
                                      result_ttl_s=self.s.result_ttl_s)
        roots = [r for r in self.s.local_roots.split(",") if r.strip()]
        self.fetcher = ImageFetcher(roots, self.s.allow_http, self.s.endpoint_url)
        self.tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self.counts: dict[str, int] = {}
        self.batcher = CallBatcher(model, size=max(1, min(self.s.max_batch_size, self.s.max_in_flight)))
        self.batcher_task = asyncio.get_running_loop().create_task(self.batcher.run())
        self.loop_task = asyncio.get_running_loop().create_task(self._run())
        self.m.CONSUMERS.set(1)
        log.info("consumer %s reading %s as group %s", self.name, self.queue.keys.uploads, self.s.group)

    # -- the loop ---------------------------------------------------------------------------------------
    async def _run(self) -> None:
        from redis.exceptions import ConnectionError, TimeoutError

        backoff = 0.1
        next_claim = next_stats = 0.0
        group_ready = False
        while not self.stopping.is_set():
            try:
                if not group_ready:
                    await self.queue.ensure_group()
                    group_ready = True
                now = time.monotonic()
                if now >= next_stats:
                    await self._update_stats()
                    next_stats = now + 2.0
                free = self.s.max_in_flight - len(self.tasks)
                if now >= next_claim and free > 0:
                    for upload in await self.queue.reclaim(int(self.s.claim_idle_s * 1000), free):
                        self._start(upload)
                    next_claim = now + max(1.0, self.s.claim_idle_s / 2)
                    free = self.s.max_in_flight - len(self.tasks)
                if free <= 0:
                    await asyncio.wait(self.tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    continue
                for upload in await self.queue.read(count=min(free, 64), block_ms=1000 if not self.tasks else 20):
                    self._start(upload)
                backoff = 0.1
            except (ConnectionError, TimeoutError, OSError) as e:
                log.warning("redis unavailable (%s); retrying in %.1f s", type(e).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        await self._drain()

    def _start(self, upload) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(upload))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _drain(self, timeout_s: float = 20.0) -> None:
        """On stop: let in-flight uploads finish; whatever does not stays pending for another consumer."""
        if self.tasks:
            done, left = await asyncio.wait(set(self.tasks), timeout=timeout_s)
            for t in left:
                t.cancel()
            log.info("consumer %s stopped: %d finished in the drain, %d left pending", self.name, len(done),
                     len(left))

    async def _update_stats(self) -> None:
        stats = await self.queue.stats()
        if stats.lag >= 0:
            self.m.QUEUE_LAG.labels(self.s.group).set(stats.lag)
        self.m.QUEUE_PENDING.labels(self.s.group).set(stats.pending)

    # -- one upload -------------------------------------------------------------------------------------
    async def _handle(self, upload) -> None:
        from ingest.fetch import FetchRetry
        from ingest.queue import MAX_DELIVERIES, BadUpload, parse_upload
        from model.preprocess import MAX_IMAGE_BYTES

        self.m.IN_FLIGHT.inc()
        try:
            if upload.deliveries > self.s.max_deliveries:
                await self._dead(upload, MAX_DELIVERIES, f"delivered {upload.deliveries} times without a result")
                return
            try:
                req = parse_upload(upload, MAX_IMAGE_BYTES)
                image = req.image
                if image is None:
                    t0 = time.perf_counter()
                    image = await asyncio.to_thread(self.fetcher.fetch, req.image_uri)
                    self.m.STAGE_SECONDS.labels("fetch").observe(time.perf_counter() - t0)
            except BadUpload as e:
                await self._dead(upload, e.reason, e.detail)
                return
            except FetchRetry as e:
                self._retry("fetch_error", upload, str(e))
                return
            out = await self._predict(image, req.tags)
            if out is None:
                self._retry("model_unavailable", upload, "no model replica answered")
            elif "error" in out:
                await self._dead(upload, out["error"], out.get("detail", ""))
            else:
                await self._write(upload, req.post_id, out)
        finally:
            self.m.IN_FLIGHT.dec()

    async def _predict(self, image: bytes, tags: list[str] | None) -> dict | None:
        for attempt in range(RETRYABLE_MODEL_ATTEMPTS):
            try:
                return await self.batcher.submit(image, tags)
            except Exception as e:  # a replica that died mid-call, or none ready yet
                if self.stopping.is_set():
                    return None
                log.warning("model call failed (%s: %s), attempt %d", type(e).__name__, str(e)[:200], attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))
        return None

    async def _write(self, upload, post_id: int, out: dict) -> None:
        from ingest.queue import result_fields

        t0 = time.perf_counter()
        summary = {"character": out["characters"][0][0] if out["characters"] else "",
                   "score": f"{out['best_character'][1]:.6f}", "model": out["model"],
                   "abstained": "1" if out["abstained"] else "0"}
        done = await self._redis(self.queue.complete, upload, post_id, result_fields(out), summary)
        if done is None:
            self._retry("redis_error", upload, "result not written")
            return
        self.m.STAGE_SECONDS.labels("write_back").observe(time.perf_counter() - t0)
        self._finished(upload, "tagged" if done else "duplicate")
        if done:
            self.m.CHARACTER_CONFIDENCE.observe(out["best_character"][1])
            if out["abstained"]:
                self.m.ABSTAINED.inc()

    async def _dead(self, upload, reason: str, detail: str) -> None:
        done = await self._redis(self.queue.dead_letter, upload, reason, detail)
        if done is None:
            self._retry("redis_error", upload, "dead letter not written")
            return
        if done:
            self.m.DEAD_LETTERS.labels(reason).inc()
            log.info("upload %s dead-lettered: %s %s", upload.entry_id, reason, detail[:200])
        self._finished(upload, "dead_letter" if done else "duplicate")

    async def _redis(self, fn, *args):
        """A final write, retried while Redis is away (restarting) for up to REDIS_WRITE_PATIENCE_S. The
        scripts are idempotent, so a retry after a lost reply cannot write twice. None: gave up."""
        from redis.exceptions import ConnectionError, TimeoutError

        deadline = time.monotonic() + REDIS_WRITE_PATIENCE_S
        delay = 0.1
        while True:
            try:
                return await fn(*args)
            except (ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _finished(self, upload, outcome: str) -> None:
        self.m.UPLOADS.labels(outcome).inc()
        self.m.END_TO_END_SECONDS.observe(max(0.0, time.time() - upload.enqueued_at))
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def _retry(self, reason: str, upload, detail: str) -> None:
        self.m.RETRIES.labels(reason).inc()
        self.counts["retry"] = self.counts.get("retry", 0) + 1
        log.warning("upload %s left pending for another delivery: %s", upload.entry_id, detail[:300])

    # -- Serve hooks ------------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"consumer": self.name, "in_flight": len(self.tasks), "counts": dict(self.counts),
                "running": not self.loop_task.done()}

    def check_health(self) -> None:
        if self.loop_task.done() and not self.stopping.is_set():
            exc = self.loop_task.exception()
            raise RuntimeError(f"consumer loop stopped: {exc!r}")

    async def __del__(self) -> None:
        self.stopping.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self.loop_task), timeout=25.0)
        await self.client.aclose()
        self.m.process_exiting()


# -- assembling the application ----------------------------------------------------------------------------
def build_app(s: ServeSettings, gpus_available: bool = False):
    from deploy.http import TaggerAPI

    env = {"env_vars": _env(s)}
    quiet = {"logging_config": {"enable_access_log": False}}  # no line per call: metrics count them
    gpus = s.replica_gpus if s.replica_gpus is not None else (1.0 if gpus_available else 0.0)
    user_config = {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s,
                   "tag_threshold": s.tag_threshold, "character_threshold": s.character_threshold, "top_k": s.top_k}
    scaling: dict[str, Any] = {"num_replicas": s.min_replicas}
    if s.max_replicas > s.min_replicas:
        scaling = {"autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                          "target_ongoing_requests": s.max_batch_size}}
    model = TaggerModel.options(
        **scaling, **quiet, user_config=user_config, max_ongoing_requests=max(4 * s.max_batch_size, 64),
        ray_actor_options={"num_cpus": s.replica_cpus, "num_gpus": gpus, "runtime_env": env},
    ).bind(s.checkpoint, s.endpoint_url, s.device, max(1, int(s.replica_cpus)))  # fmt: skip
    consumer_settings = {k: v for k, v in asdict(s).items() if k not in MODEL_ONLY}
    consumer = UploadConsumer.options(
        num_replicas=s.consumers, **quiet, graceful_shutdown_timeout_s=30, health_check_period_s=5,
        ray_actor_options={"num_cpus": 0.25, "runtime_env": env},
    ).bind(model, consumer_settings)  # fmt: skip
    return TaggerAPI.options(**quiet, ray_actor_options={"num_cpus": 0.1, "runtime_env": env}).bind(
        model, consumer, s.max_request_bytes)


# settings only the model replicas use: the consumers get their defaults, so they stay the same
MODEL_ONLY = {"tag_threshold", "character_threshold", "top_k", "batch_wait_timeout_s", "min_replicas",
              "max_replicas", "replica_cpus", "replica_gpus", "device"}


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def app_builder(args: dict):
    """Serve's application builder, for config files and KubeRay (``import_path: deploy.app:app_builder``):
    ``args`` are :class:`ServeSettings` fields (``redis`` may come from ``DANMUL_REDIS_URL`` instead,
    so the URL can live in a Secret). Deployed this way, a new ``user_config`` in the config
    (thresholds, batching) is applied by ``reconfigure`` on the running replicas."""
    if "redis" not in args and os.environ.get("DANMUL_REDIS_URL"):  # from a Kubernetes Secret
        args = {**args, "redis": os.environ["DANMUL_REDIS_URL"]}
    return build_app(ServeSettings(**args), _cluster_has_gpus())


def serve_config(s: ServeSettings) -> dict:
    """A Serve config file (``serve deploy`` / ``serve run`` / a RayService's ``serveConfigV2``) for these
    settings."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": s.http_host, "port": s.http_port},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "deploy.app:app_builder",
                          "args": asdict(s)}],
    }  # fmt: skip


def deploy(s: ServeSettings, blocking: bool = False) -> DeploymentHandle:
    """Start (or update) the application on the connected Ray cluster; returns the API's handle."""
    from deploy.metrics import remove_dead_files

    path = metrics_dir(s.metrics_port)
    os.makedirs(path, exist_ok=True)
    remove_dead_files(path)  # samples of an earlier run's processes
    serve.start(http_options={"host": s.http_host, "port": s.http_port})
    return serve.run(build_app(s, _cluster_has_gpus()), name=APP_NAME, route_prefix="/", blocking=blocking)


def undeploy() -> None:
    """Stop the application gracefully: consumers drain, unfinished uploads stay pending."""
    serve.delete(APP_NAME)
