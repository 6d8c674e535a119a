"""The model replica of the streaming tagger: ``Tagger`` behind Ray Serve's dynamic batching, shared by the
queue consumers and the HTTP API. Its rule is isolation: whatever one image or one request does (an
undecodable file, a bad parameter, an exception in the model) becomes that item's ``{"error": reason}``,
never its batch's failure; and each image is decoded in a fixed pool of worker processes
(``model.decode_pool``) within a budget of CPU time and memory, so no image can hold the replica: one that
runs over is stopped (``too_costly``), and one whose caller gave up (Serve cancels the request) is stopped
at once."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

from ray import serve

from deploy.batch import Item as _Item
from deploy.batch import score_batch
from deploy.runtime import start_metrics

log = logging.getLogger("danmul.serve")

MAX_TOP_K = 1000  # characters one answer may list at most (the API's own bound is tighter)


async def _done(value):
    return value


def check_request(threshold: Any, top_k: Any) -> str | None:
    """What is wrong with a call's parameters, or None. Checked before anything joins a batch, so one
    caller's bad value fails only its own items (the HTTP API validates first; this is the last line)."""
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0):
        return f"threshold must be a number in [0, 1], not {str(threshold)[:40]!r}"
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K):
        return f"top_k must be an integer in [1, {MAX_TOP_K}], not {str(top_k)[:40]!r}"
    return None


def _tags_ok(tags: Any) -> bool:
    return tags is None or (isinstance(tags, list | tuple) and all(isinstance(t, str) for t in tags))


@serve.deployment
class TaggerModel:
    """``Tagger`` behind dynamic batching. ``tag_many(images, tags)`` decodes in a pool of worker processes
    (the event loop keeps collecting requests) and each image joins a batch; a bad image or bad parameters
    come back as that item's ``{"error": reason, "detail": ...}``."""

    def __init__(self, checkpoint: str, endpoint_url: str | None = None, device: str | None = None,
                 threads: int = 0):
        from ingest.storage import Storage
        from model.decode_pool import DecodePool
        from model.tagger import Tagger

        self.metrics = start_metrics()
        if threads:  # intra-op threads = the replica's CPUs: more would fight the consumers for the cores
            import torch

            torch.set_num_threads(threads)
        self.tagger = Tagger.from_checkpoint(Storage(checkpoint, endpoint_url), device=device)
        self.top_k = 5
        # Decode workers are few and each holds one image within its budget (model.preprocess's pixel,
        # structure and decode budgets), so the replica's decoding CPU and memory are bounded too.
        self.decoders = DecodePool.for_config(self.tagger.config, max(2, threads + 1))
        self.metrics.MODEL_INFO.labels(self.tagger.version, self.tagger.config.image_model).set(1)
        self.metrics.MODEL_REPLICAS.labels(self.tagger.version).set(1)
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
        if len(tags) != len(images):
            tags = [*tags, *[None] * len(images)][: len(images)]
        problem = check_request(threshold, top_k)
        if problem:
            return [{"error": "bad_request", "detail": problem} for _ in images]
        decoded = await asyncio.gather(*map(self._decode, images))  # cancelled with the call: workers stop too
        k = top_k or self.top_k
        return list(await asyncio.gather(*[
            _done(d) if isinstance(d, dict) else
            _done({"error": "bad_tags", "detail": "tags must be a list of strings"}) if not _tags_ok(t) else
            self._infer(_Item(d, list(t) if t else None, k, threshold))
            for d, t in zip(decoded, tags, strict=True)
        ]))  # fmt: skip

    async def _decode(self, image: bytes) -> Any:
        """A tensor, or ``{"error": reason}`` for anything that cannot become one (decoded in a worker
        process). Whatever the bytes make PIL do, the answer is this image's error, never the replica's."""
        import torch

        from model.preprocess import ImageError

        t0 = time.perf_counter()
        try:
            if not isinstance(image, bytes | bytearray | memoryview):
                raise ImageError("not_an_image", f"{type(image).__name__}, not bytes")
            out = torch.from_numpy(await self.decoders.preprocess_async(bytes(image)))
        except ImageError as e:
            return {"error": e.reason, "detail": str(e)[:300]}
        self.metrics.STAGE_SECONDS.labels("decode").observe(time.perf_counter() - t0)
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _infer(self, items: list[_Item]) -> list[dict]:
        t0 = time.perf_counter()
        try:
            out = self._score(items)
        except Exception as e:  # the batch failed as a whole: find the item(s) at fault, one by one
            log.warning("batch of %d failed (%s: %s); scoring its images one by one", len(items), type(e).__name__,
                        str(e)[:200])
            out = []
            for item in items:
                try:
                    out += self._score([item])
                except Exception as e1:
                    out.append({"error": "model_error", "detail": f"{type(e1).__name__}: {str(e1)[:200]}"})
        elapsed = time.perf_counter() - t0
        self.metrics.BATCH_SIZE.observe(len(items))
        for _ in items:
            self.metrics.STAGE_SECONDS.labels("inference").observe(elapsed)
        return out

    def _score(self, items: list[_Item]) -> list[dict]:
        # on the event loop itself: a worker thread here only added GIL hand-offs (measured no faster);
        # decoding runs in worker processes, and the next batch forms when this one returns
        return score_batch(self.tagger, items)

    def __del__(self) -> None:
        if hasattr(self, "decoders"):
            self.decoders.close()
        if hasattr(self, "metrics"):
            self.metrics.process_exiting()
