"""danmul's Prometheus metrics: every ``danmul_*`` metric is defined here, once, next to the dashboards
and alert rules that chart them. Serving (``deploy``), training and backfill (``ray_jobs``) all import
this module, and none of them imports another for it; each serves it the same way
(:func:`serve_node_metrics`).

The streaming tagger runs as several processes per node (queue consumers, model replicas, the HTTP
API). They record with prometheus-client in multiprocess mode: each process writes its samples to
memory-mapped files in one folder per node (``PROMETHEUS_MULTIPROC_DIR``, set for every replica by
``deploy.app``), and one HTTP endpoint per node (``--metrics-port``) serves their aggregate. The first
danmul process on a node to bind the port serves it; the others retry now and then, so the endpoint
survives the death of whichever process held it. Counters of processes that died still count (totals
never go backwards); gauges of dead processes are dropped at each scrape.

Import this module only in processes that record: it reads ``PROMETHEUS_MULTIPROC_DIR`` when
prometheus-client is first imported.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
if os.environ.get(MULTIPROC_ENV):
    os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402
from prometheus_client import multiprocess as _mp  # noqa: E402

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

# -- streaming tagger ------------------------------------------------------------------------------------
UPLOADS = Counter("danmul_uploads_total", "Uploads finished by a consumer, by outcome: tagged (result written), "
                  "dead_letter, duplicate (another delivery had already finished it), gone (no longer in the "
                  "stream when its outcome was to be written: nothing written)", ["outcome"])
RECOVERED = Counter("danmul_uploads_recovered_total", "Uploads Redis had forgotten part of (a failover, a restart "
                    "from an older snapshot, an append-only file replayed in part) and the tagger did again, by "
                    "what was forgotten: delivery (no longer pending while a consumer worked on it: its outcome "
                    "was written all the same), acknowledgement (marked delivered, with no result or dead letter: "
                    "made pending again)", ["what"])
RETRIES = Counter("danmul_upload_retries_total", "Uploads left pending for another delivery, by reason "
                  "(fetch_error, fetch_timeout, model_unavailable, model_timeout, replica_died, redis_error, "
                  "internal_error)", ["reason"])
DEAD_LETTERS = Counter("danmul_dead_letters_total", "Uploads moved to the dead-letter stream, by reason code",
                       ["reason"])
STAGE_SECONDS = Histogram("danmul_stage_seconds", "Time per upload in each stage: fetch, decode, inference "
                          "(the upload's share is its whole batch's time), write_back", ["stage"],
                          buckets=LATENCY_BUCKETS)
END_TO_END_SECONDS = Histogram("danmul_end_to_end_seconds", "From the upload's stream entry (its Redis "
                               "timestamp) to its result or dead letter written", buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("danmul_batch_size", "Images per model batch (dynamic batching)", buckets=BATCH_BUCKETS)
CHARACTER_CONFIDENCE = Histogram("danmul_character_confidence", "Top-1 character probability of each tagged "
                                 "upload", buckets=SCORE_BUCKETS)
ABSTAINED = Counter("danmul_abstained_total", "Tagged uploads where the model abstained from naming a character")
QUEUE_LAG = Gauge("danmul_queue_lag", "Uploads in the stream not yet delivered to any consumer of the group",
                  ["group"], multiprocess_mode="mostrecent")
QUEUE_PENDING = Gauge("danmul_queue_pending", "Uploads delivered to a consumer and not yet acknowledged",
                      ["group"], multiprocess_mode="mostrecent")
IN_FLIGHT = Gauge("danmul_in_flight", "Uploads a consumer is working on now", multiprocess_mode="livesum")
CONSUMERS = Gauge("danmul_consumers", "Queue consumers running", multiprocess_mode="livesum")
MODEL_REPLICAS = Gauge("danmul_model_replicas", "Model replicas running, by model version", ["model"],
                       multiprocess_mode="livesum")
MODEL_INFO = Gauge("danmul_model_info", "The model a replica serves: 1 per version", ["model", "image_model"],
                   multiprocess_mode="livemax")
REDIS_ERRORS = Counter("danmul_redis_errors_total", "Redis commands or scripts that failed with an error Redis "
                       "answered (not an outage), by operation: read, claim, complete, dead_letter, trim, touch, "
                       "stats, group, audit, forget; the upload concerned stays pending", ["op"])
STREAM_TRIMMED = Counter("danmul_stream_trimmed_total", "Acknowledged upload entries trimmed from the uploads "
                         "stream by the tagger (retention)")
REDIS_UP = Gauge("danmul_redis_up", "1 while the consumer can read and write Redis with its credentials, 0 while "
                 "Redis is unreachable, refuses them, or answers no PING within 2 s", multiprocess_mode="livemin")
HTTP_REQUESTS = Counter("danmul_http_requests_total", "HTTP API requests by endpoint and status code (499: "
                        "the client went away)",
                        ["endpoint", "code"])
HTTP_SECONDS = Histogram("danmul_http_request_seconds", "HTTP API request time by endpoint", ["endpoint"],
                         buckets=LATENCY_BUCKETS)

# -- backfill (served by the backfill driver, which counts what its actors report) --------------------------
BACKFILL_IMAGES = Counter("danmul_backfill_images_total", "Backfill images finished, by outcome: tagged, error, retry",
                          ["outcome"])
BACKFILL_RATE = Gauge("danmul_backfill_images_per_second", "Backfill throughput since the job started",
                      multiprocess_mode="mostrecent")

# -- training (served by the rank-0 training worker, danmul train --metrics-port) ------------------------------
TRAIN_LOSS = Gauge("danmul_train_loss", "Training loss of the last step (rank 0)", multiprocess_mode="mostrecent")
TRAIN_STEP = Gauge("danmul_train_step", "Global training step", multiprocess_mode="mostrecent")
TRAIN_EPOCH = Gauge("danmul_train_epoch", "Last finished epoch", multiprocess_mode="mostrecent")
TRAIN_SAMPLES_PER_SECOND = Gauge("danmul_train_samples_per_second", "Training samples/s over the last epoch, all "
                                 "workers", multiprocess_mode="mostrecent")
TRAIN_TEXT_DROP = Gauge("danmul_train_text_drop_rate", "Curriculum: current chance of dropping a sample's tags",
                        multiprocess_mode="mostrecent")
TRAIN_VAL_TOP1 = Gauge("danmul_train_val_top1", "Validation top-1 character accuracy after the last epoch, by "
                       "mode (image_only, image_tags)", ["mode"], multiprocess_mode="mostrecent")

_LIVE_FILE = re.compile(r"_live\w*_(\d+)\.db$")
_PID = re.compile(r"_(\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_files(path: str) -> int:
    """Delete the sample files of processes no longer alive (a fresh ``danmul serve`` starts from zero;
    the files of a running one are kept, so a config update does not reset its counters)."""
    removed = 0
    for f in glob.glob(os.path.join(path, "*.db")):
        m = _PID.search(f)
        if m and not _alive(int(m.group(1))):
            os.remove(f)
            removed += 1
    return removed


class NodeCollector:
    """The aggregate of every danmul process on this node; drops the live gauges of dead processes first."""

    def __init__(self, path: str):
        self.path = path
        self._inner = _mp.MultiProcessCollector(None, path=path)

    def collect(self):
        for f in glob.glob(os.path.join(self.path, "*.db")):
            m = _LIVE_FILE.search(f)
            if m and not _alive(int(m.group(1))):
                _mp.mark_process_dead(int(m.group(1)), self.path)
        return self._inner.collect()


def registry() -> CollectorRegistry:
    """What the node endpoint serves: the multiprocess aggregate, or this process's metrics alone."""
    from prometheus_client import REGISTRY

    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return REGISTRY
    reg = CollectorRegistry()
    reg.register(NodeCollector(path))
    return reg


def serve_node_metrics(port: int, host: str = "0.0.0.0", retry_s: float = 15.0) -> None:
    """Serve this node's metrics on ``port`` if nobody does; otherwise keep trying in the background (a
    daemon thread) so the endpoint comes back when its holder dies. ``port`` 0 disables it."""
    if port <= 0:
        return

    def attempt() -> bool:
        from prometheus_client import start_http_server

        try:
            start_http_server(port, addr=host, registry=registry())
        except OSError:
            return False
        log.info("danmul metrics on http://%s:%d/metrics", host, port)
        return True

    if attempt():
        return

    def keep_trying() -> None:
        stop = threading.Event()
        while not stop.wait(retry_s):
            if attempt():
                return

    threading.Thread(target=keep_trying, name="danmul-metrics-port", daemon=True).start()


def process_exiting() -> None:
    """Drop this process's live gauges now (a clean shutdown; a killed process is cleaned at scrape)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        _mp.mark_process_dead(os.getpid(), path)
