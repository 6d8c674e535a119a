"""The queue consumer of the streaming tagger: reads uploads from Redis and sees each one to exactly one
result or one dead letter (the protocol is ``ingest.queue``; this is its Ray Serve deployment).

Per upload: parse the entry's fields -> fetch the image (object storage, an allowed local root, inline)
-> the model (grouped calls through :class:`CallBatcher`) -> write the result, or dead-letter with a
reason. Whatever fails for a reason that may pass (storage trouble, a model replica dying, Redis away, a
script error) leaves the upload pending with its reason recorded; another delivery tries again, and the
last reason names the dead letter once ``max_deliveries`` is reached. Nothing that one upload does can stop
the loop: every exception ends that upload's attempt, not the consumer.

Memory is bounded in bytes (``max_in_flight_bytes``, plus one entry of at most ``max_entry_bytes``) as
well as in uploads (``max_in_flight``). An upload delivered more than once goes through the isolation
lane: sent to the model alone, one at a time, so an image that takes a model replica down fails only
itself there (and becomes a ``poison`` dead letter after ``max_deliveries``), not the uploads batched
with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.settings import ServeSettings

log = logging.getLogger("danmul.serve")

MODEL_UNAVAILABLE_ATTEMPTS = 3  # a model call refused because no replica is ready is retried this often
REDIS_WRITE_PATIENCE_S = 30.0  # how long a finished upload waits for Redis to come back before it is left
IDLE_POLL_S = (0.005, 0.1)  # polling for new uploads when the stream is empty: first and longest wait
STATS_INTERVAL_S = 2.0
AUDIT_INTERVAL_S = (0.2, 5.0)  # the audit of forgotten deliveries: while walking; once caught up (a look at run_id)
TRIM_AGAIN_S = 0.5  # the next trim, when a stream's cap ran out of its budget per call
FORGET_INTERVAL_S = 60.0  # how often consumers that left their names behind are deleted from the group
FORGET_IDLE_S = 600.0  # a consumer with nothing pending, not heard from this long, is deleted from the group
# Redis round trips: a command gets this long (scripts are bounded: no reply within it means Redis hangs); the
# heartbeat behind /health pings on a connection of its own, every HEARTBEAT_S, and calls Redis unresponsive
# when no answer came within HEARTBEAT_TIMEOUT_S
REDIS_COMMAND_TIMEOUT_S = 10.0
HEARTBEAT_S, HEARTBEAT_TIMEOUT_S = 1.0, 2.0
# once the consumer is stopping, a model call in flight gets this long to answer, then its upload is left
# pending (redelivered after the restart): a stop deletes the model with the consumers, and a call whose
# replica is gone would otherwise hold the stop for the whole model timeout
STOP_GRACE_S = 3.0
REDIS_ERROR_LOG_INTERVAL_S = 30.0


class CallBatcher:
    """Groups a consumer's model requests: up to ``size`` uploads (or what arrives within ``wait_s``) go
    to the model in one ``tag_many`` call. A Serve call costs the caller about a millisecond of CPU, as
    much as a tiny model's inference per image; one call per group keeps the consumer off the critical
    path. Several groups are in flight at once; the replica batches images across them. A call whose
    callers have all given up (each upload's wait has its timeout) is cancelled, so the replica does not
    go on decoding for nobody."""

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
            group = [g for g in group if not g[2].done()]  # callers that gave up (timed out) need nothing
            if not group:
                continue
            call = loop.create_task(self._call(group))
            self.calls.add(call)
            call.add_done_callback(self.calls.discard)

    async def _call(self, group: list) -> None:
        call = asyncio.ensure_future(self.model.tag_many.remote([g[0] for g in group], [g[1] for g in group]))
        waiting = len(group)

        def gave_up(_) -> None:  # a caller's future ended (answered, or its wait timed out)
            nonlocal waiting
            waiting -= 1
            if not waiting and not call.done():  # nobody waits for the answer: the replica stops working on it
                call.cancel()

        for _, _, fut in group:
            fut.add_done_callback(gave_up)
        try:
            results = await call
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this task was cancelled (the consumer stops)
                raise
            return  # the call was, by gave_up: Serve cancels the request on the replica (its decodes stop)
        except Exception as e:  # the replica died, or none is ready: each upload decides what to do
            for _, _, fut in group:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, _, fut), result in zip(group, results, strict=True):
            if not fut.done():
                fut.set_result(result)


class LeftPending(Exception):
    """This delivery of an upload ends without an outcome; ``reason`` is recorded for the next one."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _replica_died(e: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(e, RayActorError) or "ActorDiedError" in type(e).__name__


@serve.deployment
class UploadConsumer:
    """Reads uploads through the consumer group and sees each one to a result or a dead letter.

    At most ``max_in_flight`` uploads and about ``max_in_flight_bytes`` of entries are held at once: the
    next read asks only for what is free, so a backlog of millions waits in Redis, not here. Every
    ``claim_idle_s / 2`` the consumer also reclaims uploads left pending by consumers that died, and every
    ``trim_interval_s`` it trims acknowledged history from the uploads stream."""

    def __init__(self, model: DeploymentHandle, settings: dict):
        from deploy.runtime import start_metrics
        from ingest.fetch import ImageFetcher, default_allowed_buckets
        from ingest.queue import AsyncUploadQueue, Keys, connect

        self.settings = ServeSettings(**settings)
        self.metrics = start_metrics()
        self.model = model
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        keys = Keys(self.settings.prefix)
        self._check_redis(keys)
        s = self.settings
        self.client = connect(s.redis, asyncio=True, socket_timeout=REDIS_COMMAND_TIMEOUT_S, ca_file=s.redis_ca_file,
                              cluster=s.redis_cluster)
        # the heartbeat's own connection: a pool whose connections all wait on a hung Redis must not hold it up
        self.pinger = connect(s.redis, asyncio=True, socket_timeout=HEARTBEAT_TIMEOUT_S, retries=0, max_connections=1,
                              ca_file=s.redis_ca_file, cluster=s.redis_cluster)
        self.queue = AsyncUploadQueue(self.client, keys, s.group, self.name, result_ttl_s=s.result_ttl_s,
                                      max_entry_bytes=s.max_entry_bytes)
        roots = [r for r in s.local_roots.split(",") if r.strip()]
        self.fetcher = ImageFetcher(roots, s.allow_http, s.endpoint_url,
                                    allowed_buckets=default_allowed_buckets(s.checkpoint, s.allowed_buckets),
                                    timeout_s=s.fetch_timeout_s)
        # fetch threads of their own, one per upload in flight: in asyncio's default pool (a few threads) a fetch
        # would spend its deadline waiting for a thread behind slow storage, and a thread stuck in a hung network
        # mount would take one from every other fetch
        self.fetch_pool = concurrent.futures.ThreadPoolExecutor(s.max_in_flight, thread_name_prefix="fetch")
        self.tasks: set[asyncio.Task] = set()
        self.held_bytes = 0
        self.held: dict[str, int] = {}  # entry id -> bytes, of the uploads being worked on
        self.ended_elsewhere: set[str] = set()  # held uploads a script has already ended (deleted meanwhile)
        self.stopping = asyncio.Event()
        self.stop_deadline = float("inf")  # when the stop began, plus STOP_GRACE_S
        self.counts: dict[str, int] = {}
        self.redis_problem: str | None = None  # what the loop's last Redis call ran into
        self.unresponsive: str | None = None  # what the heartbeat sees: Redis answers no PING in time
        self._last_redis_log = 0.0
        self._undelivered_deleted = False
        self.solo = asyncio.Lock()  # the isolation lane: redelivered uploads, one at a time
        self.batcher = CallBatcher(model, size=max(1, min(self.settings.max_batch_size, self.settings.max_in_flight)))
        self.batcher_task = asyncio.get_running_loop().create_task(self.batcher.run())
        self.loop_task = asyncio.get_running_loop().create_task(self._run())
        self.heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())
        self.metrics.CONSUMERS.set(1)
        log.info("consumer %s reading %s as group %s", self.name, keys.uploads, self.settings.group)

    def _check_redis(self, keys) -> None:
        """Wrong credentials, an evicting Redis or a cluster prefix without a hash tag are fatal here, with
        the reason (``RedisSetupError``; Serve reports the deployment as failed); an unreachable Redis is
        not (it may be starting: the loop waits for it)."""
        from redis.exceptions import ConnectionError, TimeoutError

        from ingest.queue import check_server, connect

        s = self.settings
        client = connect(s.redis, ca_file=s.redis_ca_file, cluster=s.redis_cluster, retries=0)
        try:
            for warning in check_server(client, keys, s.allow_eviction, s.redis_cluster, s.group, s.allow_other_groups):
                log.warning("%s", warning)
        except (ConnectionError, TimeoutError, OSError) as e:
            log.warning("redis not reachable at start-up (%s); waiting for it", type(e).__name__)
        finally:
            client.close()

    # -- the loop ---------------------------------------------------------------------------------------
    def _free(self) -> tuple[int, int]:
        return self.settings.max_in_flight - len(self.tasks), self.settings.max_in_flight_bytes - self.held_bytes

    async def _run(self) -> None:
        import redis
        from redis.exceptions import ConnectionError, TimeoutError

        from ingest.queue import AUTH_ERRORS, tls_untrusted

        backoff, idle = 0.1, IDLE_POLL_S[0]
        next_claim = next_stats = next_trim = next_touch = next_audit = next_forget = 0.0
        group_ready = False
        op = "read"
        while not self.stopping.is_set():
            try:
                if not group_ready:
                    op = "group"
                    await self.queue.ensure_group()
                    group_ready = True
                # housekeeping on timers of its own, each rescheduled before it runs: one that keeps
                # failing (a Redis error) never keeps the loop from reading
                now = time.monotonic()
                if now >= next_stats:
                    op, next_stats = "stats", now + STATS_INTERVAL_S
                    await self._update_stats()
                if now >= next_touch and self.held:
                    op, next_touch = "touch", now + max(0.5, self.settings.claim_idle_s / 3)
                    await self._touch()
                if now >= next_trim:
                    op, next_trim = "trim", now + self.settings.trim_interval_s
                    trimmed = await self.queue.trim(self.settings.stream_retention_s)
                    self.metrics.STREAM_TRIMMED.inc(trimmed.uploads)
                    if trimmed.more:  # the results or dead-letter stream is further over its cap: go on soon
                        next_trim = now + TRIM_AGAIN_S
                if now >= next_forget:
                    op, next_forget = "forget", now + FORGET_INTERVAL_S
                    await self.queue.forget_consumers(FORGET_IDLE_S)
                if now >= next_audit:
                    op, next_audit = "audit", now + AUDIT_INTERVAL_S[1]
                    if await self._audit():
                        next_claim = now  # what it made pending again is for the reclaim, now
                    if not self.queue.audit_state.caught_up:
                        next_audit = now + AUDIT_INTERVAL_S[0]
                free, budget = self._free()
                if now >= next_claim and free > 0 and budget > 0:
                    op, next_claim = "claim", now + max(1.0, self.settings.claim_idle_s / 2)
                    self._take(await self.queue.reclaim(int(self.settings.claim_idle_s * 1000), free, budget,
                                                        self.settings.max_deliveries))
                    free, budget = self._free()
                if free <= 0 or budget <= 0:
                    await asyncio.wait(self.tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    continue
                op = "read"
                delivery = await self.queue.read(min(free, 64), budget)
                self._take(delivery)
                self._redis_ok()
                backoff = 0.1
                if delivery.uploads or delivery.dead:
                    idle = IDLE_POLL_S[0]
                else:  # nothing waiting: poll again soon (reads never block, so a huge entry is never fetched)
                    await asyncio.sleep(idle)
                    idle = min(idle * 2, IDLE_POLL_S[1])
            except AUTH_ERRORS as e:
                self._redis_down(f"Redis refused the credentials ({e}): check REDIS_USERNAME/REDIS_PASSWORD and "
                                 "the user's ACL", error=True)
                backoff = min(max(backoff * 2, 1.0), 30.0)
                await asyncio.sleep(backoff)
            except (ConnectionError, TimeoutError, OSError) as e:
                if tls_untrusted(e):
                    self._redis_down("Redis's TLS certificate is not trusted: set --redis-ca-file", error=True)
                else:
                    self._redis_down(f"Redis unavailable ({type(e).__name__})")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except redis.ResponseError as e:  # Redis answered with an error (wrong key type, OOM, READONLY, ...)
                self.metrics.REDIS_ERRORS.labels(op).inc()
                self._redis_down(f"Redis error in {op}: {str(e)[:300]}", error=True)
                group_ready = group_ready and "NOGROUP" not in str(e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as e:  # a bug must not stop the stream: log it, wait, go on
                log.exception("consumer loop error in %s: %r", op, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        await self._drain()

    async def _audit(self) -> int:
        """One step of the audit of deliveries Redis forgot (``ingest.queue``'s ledger): after a restart or a
        failover, uploads that are neither pending nor ended are made pending again for the reclaim."""
        seen = self.queue.audit_state.run_id
        found = await self.queue.audit()
        if seen and self.queue.audit_state.run_id != seen:
            log.warning("Redis is another run than before (restarted or failed over): checking the uploads it "
                        "delivered for any it forgot")
        if found:
            self.metrics.RECOVERED.labels("acknowledgement").inc(found)
            log.warning("%d upload(s) Redis had marked delivered without a result or dead letter (it forgot part "
                        "of what was written): they will be processed again", found)
        return found

    def _take(self, delivery) -> None:
        if delivery.ended:  # delivered again, but the ledger knows their outcome: acknowledged by the script
            self.metrics.UPLOADS.labels("duplicate").inc(delivery.ended)
        if delivery.lag_corrected:
            log.warning("Redis counted %d upload(s) as waiting for %s that are not in the stream: entries deleted "
                        "before they were delivered (XTRIM/XDEL by hand, XADD with MAXLEN: those uploads are lost), "
                        "or a replay or failover that lost the group's read counter; the count is set right",
                        delivery.lag_corrected, self.settings.group)
        for dead in delivery.dead:  # dead-lettered inside Redis (too large, delivered too often, deleted)
            self.metrics.DEAD_LETTERS.labels(dead.reason).inc()
            self._finished(dead.entry_id, "dead_letter")
            log.info("upload %s dead-lettered: %s %s", dead.entry_id, dead.reason, dead.detail[:200])
        for upload in delivery.uploads:
            self.held_bytes += upload.size
            self.held[upload.entry_id] = upload.size
            task = asyncio.get_running_loop().create_task(self._handle(upload))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _touch(self) -> None:
        """Uploads being worked on are not idle: keep other consumers off them. Those deleted from the stream
        meanwhile were just dead-lettered (``deleted``) by the script: their work is moot."""
        _, gone = await self.queue.touch(list(self.held))
        for entry_id in gone:
            self.ended_elsewhere.add(entry_id)
            self.metrics.DEAD_LETTERS.labels("deleted").inc()
            self._finished(entry_id, "dead_letter")
            log.info("upload %s dead-lettered: deleted from the stream while it was being worked on", entry_id)

    def _redis_ok(self) -> None:
        if self.redis_problem is not None:
            log.info("redis available again")
        self.redis_problem = None
        self._publish_redis_up()

    def _publish_redis_up(self) -> None:
        """``danmul_redis_up``: 1 while neither the loop nor the heartbeat has a Redis problem to report."""
        self.metrics.REDIS_UP.set(0 if self.redis_problem or self.unresponsive else 1)

    async def _heartbeat(self) -> None:
        """PING Redis every HEARTBEAT_S on a connection of its own: a Redis that hangs (stopped, swapping, a
        network that drops packets) shows in /health within seconds, not after the loop's command timeout."""
        from ingest.queue import AUTH_ERRORS

        since = None
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.pinger.ping(), HEARTBEAT_TIMEOUT_S)
                if self.unresponsive is not None:
                    log.info("redis answers again")
                self.unresponsive, since = None, None
            except Exception as e:  # whatever it is, Redis did not answer the PING
                since = since or time.monotonic()
                if isinstance(e, AUTH_ERRORS):
                    problem = f"Redis refused the credentials ({e})"
                else:
                    problem = (f"Redis does not answer ({type(e).__name__}) for "
                               f"{time.monotonic() - since + HEARTBEAT_TIMEOUT_S:.0f} s")
                if self.unresponsive is None:
                    log.warning("%s", problem)
                self.unresponsive = problem
            self._publish_redis_up()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), HEARTBEAT_S)

    def _redis_down(self, problem: str, error: bool = False) -> None:
        now = time.monotonic()
        if problem != self.redis_problem or now - self._last_redis_log > REDIS_ERROR_LOG_INTERVAL_S:
            (log.error if error else log.warning)("%s; retrying", problem)
            self._last_redis_log = now
        self.redis_problem = problem
        self._publish_redis_up()

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
            self.metrics.QUEUE_LAG.labels(self.settings.group).set(stats.lag)
        self.metrics.QUEUE_PENDING.labels(self.settings.group).set(stats.pending)
        if stats.undelivered_deleted and not self._undelivered_deleted:
            log.error("Redis cannot count %s's lag: entries the group had not read yet were probably deleted by "
                      "something other than the tagger (XTRIM/XDEL by hand, or XADD with MAXLEN), and those "
                      "uploads are lost. Let the tagger trim the stream (--stream-retention-s)",
                      self.queue.keys.uploads)
        self._undelivered_deleted = stats.undelivered_deleted

    # -- one upload -------------------------------------------------------------------------------------
    async def _handle(self, upload) -> None:
        self.metrics.IN_FLIGHT.inc()
        try:
            await self._process(upload)
        except LeftPending as e:
            await self._leave(upload, e.reason, e.detail)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or an exception nobody expected: this upload's attempt ends, not the loop
            log.exception("upload %s: unexpected error", upload.entry_id)
            await self._leave(upload, "internal_error", f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            self.held_bytes -= upload.size
            self.held.pop(upload.entry_id, None)
            self.ended_elsewhere.discard(upload.entry_id)
            self.metrics.IN_FLIGHT.dec()

    async def _process(self, upload) -> None:
        from ingest.fetch import FETCH_TIMEOUT, FetchRetry
        from ingest.queue import INLINE_IMAGE_MAX, BadUpload, parse_upload

        try:
            req = parse_upload(upload, INLINE_IMAGE_MAX)
            image = req.image
            if image is None:
                t0 = time.perf_counter()
                timeout = self.settings.fetch_timeout_s
                # the thread gives up at this deadline itself; the wait ends there even when a call in the thread
                # does not (a thread cannot be killed), and the upload is released either way
                fetching = asyncio.get_running_loop().run_in_executor(
                    self.fetch_pool, self.fetcher.fetch, req.image_uri, time.monotonic() + timeout)
                try:
                    image = await asyncio.wait_for(fetching, timeout)
                except TimeoutError:
                    raise FetchRetry(f"{req.image_uri[:200]}: no image within {timeout:g} s",
                                     reason=FETCH_TIMEOUT) from None
                self.metrics.STAGE_SECONDS.labels("fetch").observe(time.perf_counter() - t0)
        except BadUpload as e:
            await self._dead(upload, e.reason, e.detail)
            return
        except FetchRetry as e:
            raise LeftPending(e.reason, str(e)) from None
        out = await self._predict(upload, image, req.tags)
        if "error" in out:
            await self._dead(upload, out["error"], out.get("detail", ""))
        else:
            await self._write(upload, req.post_id, out)

    async def _predict(self, upload, image: bytes, tags: list[str] | None) -> dict:
        """The model's answer, or :class:`LeftPending`. A first delivery joins a grouped call; if the model
        replica dies under that group, the upload is tried once more alone. A redelivered upload goes
        through the isolation lane only."""
        timeout = self.settings.model_timeout_s
        if upload.deliveries <= 1:
            for attempt in range(MODEL_UNAVAILABLE_ATTEMPTS):
                try:
                    return await self._answer(self.batcher.submit(image, tags), timeout)
                except TimeoutError:
                    raise LeftPending("model_timeout", f"no answer within {timeout:.0f} s") from None
                except LeftPending:
                    raise
                except Exception as e:
                    if self.stopping.is_set():
                        raise LeftPending("model_unavailable", "consumer stopping") from None
                    if _replica_died(e):
                        break  # someone in the group (maybe this upload) took the replica down: try alone
                    log.warning("model call failed (%s: %s), attempt %d", type(e).__name__, str(e)[:200], attempt + 1)
                    await asyncio.sleep(0.5 * (attempt + 1))
            else:
                raise LeftPending("model_unavailable", "no model replica answered")
        async with self.solo:
            try:
                [out] = await self._answer(self.model.tag_many.remote([image], [tags]), timeout)
                return out
            except TimeoutError:
                raise LeftPending("model_timeout", f"no answer within {timeout:.0f} s alone") from None
            except LeftPending:
                raise
            except Exception as e:
                reason = "replica_died" if _replica_died(e) else "model_unavailable"
                raise LeftPending(reason, f"{type(e).__name__}: {str(e)[:200]}") from None

    async def _write(self, upload, post_id: int, out: dict) -> None:
        from ingest.queue import result_fields

        t0 = time.perf_counter()
        summary = {"character": out["characters"][0][0] if out["characters"] else "",
                   "score": f"{out['best_character'][1]:.6f}", "model": out["model"],
                   "abstained": "1" if out["abstained"] else "0"}
        done = await self._redis("complete", upload, self.queue.complete, upload, post_id, result_fields(out), summary)
        if done is None:
            return
        self.metrics.STAGE_SECONDS.labels("write_back").observe(time.perf_counter() - t0)
        self._ended(upload, done, "tagged")
        if done:
            self.metrics.CHARACTER_CONFIDENCE.observe(out["best_character"][1])
            if out["abstained"]:
                self.metrics.ABSTAINED.inc()

    async def _dead(self, upload, reason: str, detail: str) -> None:
        done = await self._redis("dead_letter", upload, self.queue.dead_letter, upload, reason, detail)
        if done is None:
            return
        if done:
            self.metrics.DEAD_LETTERS.labels(reason).inc()
            log.info("upload %s dead-lettered: %s %s", upload.entry_id, reason, detail[:200])
        self._ended(upload, done, "dead_letter")

    def _ended(self, upload, done, outcome: str) -> None:
        """Count what a script that ends an upload did (``done``: an ``ingest.queue.Ended``)."""
        from ingest.queue import Ended

        if done.recovered:
            self.metrics.RECOVERED.labels("delivery").inc()
            log.warning("upload %s was no longer pending (Redis forgot its delivery); its %s was written all the "
                        "same", upload.entry_id, outcome.replace("_", " "))
        if done:
            self._finished(upload.entry_id, outcome)
        elif upload.entry_id not in self.ended_elsewhere:
            if done == Ended.GONE:
                log.warning("upload %s is no longer in the uploads stream (trimmed after another delivery ended "
                            "it, deleted, or lost by Redis): nothing written", upload.entry_id)
            self._finished(upload.entry_id, "gone" if done == Ended.GONE else "duplicate")

    async def _redis(self, op: str, upload, fn, *args) -> Any:
        """A final write, retried while Redis is away (restarting) for up to REDIS_WRITE_PATIENCE_S (the
        scripts are idempotent, so a retry after a lost reply cannot write twice). A script that fails
        (Redis answered an error) is counted and logged; the upload stays pending. None: not written."""
        import redis
        from redis.exceptions import ConnectionError, TimeoutError

        deadline = time.monotonic() + REDIS_WRITE_PATIENCE_S
        delay = 0.1
        while True:
            try:
                return await fn(*args)
            except redis.ResponseError as e:
                self.metrics.REDIS_ERRORS.labels(op).inc()
                log.error("upload %s: Redis refused the %s script: %s", upload.entry_id, op, str(e)[:300])
                await self._leave(upload, "internal_error", f"{op}: {str(e)[:200]}")
                return None
            except (ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    await self._leave(upload, "redis_error", f"{op} not written")
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _leave(self, upload, reason: str, detail: str) -> None:
        """Leave the upload pending for another delivery, recording why (best effort: Redis may be away)."""
        self.metrics.RETRIES.labels(reason).inc()
        self.counts["retry"] = self.counts.get("retry", 0) + 1
        log.warning("upload %s left pending for another delivery: %s %s", upload.entry_id, reason, detail[:300])
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.queue.record_attempt(upload.entry_id, reason), 5.0)

    def _finished(self, entry_id: str, outcome: str) -> None:
        from ingest.queue import entry_ms

        self.metrics.UPLOADS.labels(outcome).inc()
        self.metrics.END_TO_END_SECONDS.observe(max(0.0, time.time() - entry_ms(entry_id) / 1000))
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    # -- Serve hooks ------------------------------------------------------------------------------------
    def status(self) -> dict:
        return {"consumer": self.name, "in_flight": len(self.tasks), "held_bytes": self.held_bytes,
                "counts": dict(self.counts), "running": not self.loop_task.done(),
                "redis": self.redis_problem or self.unresponsive or "ok"}

    async def _answer(self, call, timeout: float):
        """``call``'s answer within ``timeout`` (else :class:`TimeoutError`); once the consumer is stopping,
        within :data:`STOP_GRACE_S` more at most (else :class:`LeftPending`: the upload stays pending)."""
        answer = asyncio.ensure_future(call)
        grace = asyncio.ensure_future(self._stop_grace())
        try:
            done, _ = await asyncio.wait({answer, grace}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            grace.cancel()
            if not answer.done():  # timed out, stopped, or this wait itself cancelled: the call is abandoned
                answer.cancel()
        if answer in done:
            return answer.result()
        if grace in done:
            raise LeftPending("model_unavailable", f"consumer stopping: no answer {STOP_GRACE_S:.0f} s into the stop")
        raise TimeoutError

    async def _stop_grace(self) -> None:
        """Returns :data:`STOP_GRACE_S` after the stop began: one deadline for every call, so calls that
        queue one after another (the isolation lane) do not each wait their own grace, and a call that
        starts after the deadline is left at once."""
        await self.stopping.wait()
        await asyncio.sleep(max(0.0, self.stop_deadline - time.monotonic()))

    def check_health(self) -> None:
        if self.loop_task.done() and not self.stopping.is_set():
            exc = self.loop_task.exception()
            raise RuntimeError(f"consumer loop stopped: {exc!r}")

    async def __del__(self) -> None:
        self.stop_deadline = time.monotonic() + STOP_GRACE_S
        self.stopping.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self.loop_task), timeout=25.0)
        self.heartbeat_task.cancel()
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        await self.client.aclose()
        with contextlib.suppress(Exception):
            await self.pinger.aclose()
        self.metrics.process_exiting()
