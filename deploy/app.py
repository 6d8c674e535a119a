"""The streaming tagger as one Ray Serve application: queue consumers, batched model replicas, HTTP API.

    Redis uploads ──read script──> UploadConsumer (deploy.consumer; N, one per node is typical)
                                    │ fetch (allowed buckets / allowed local root / inline bytes)
                                    ▼
                                  TaggerModel (autoscaled; a GPU each when the cluster has GPUs)
                                    │ decode + preprocess per image (bounded threads), @serve.batch inference
                                    ▼
                                  UploadConsumer ──Lua: check pending, HSET result + XADD results, XACK──> Redis
    HTTP  POST /evaluate, POST /v1/tag, GET /health ──> TaggerAPI (deploy.http) ──> TaggerModel

One module per role: ``deploy.consumer`` (the queue consumer, where the exactly-once rule lives, with
``ingest.queue``), ``deploy.replica`` (the model replica, whose rule is isolation: whatever one image or
one request does becomes that item's ``{"error": reason}``, never its batch's failure), ``deploy.http``
(the API), ``deploy.runtime`` (what every replica process shares); this module assembles them.
Thresholds, batch size and batch wait are ``user_config`` of the model deployment, applied in
``reconfigure`` (with a ``serve deploy`` config file Serve does that on running replicas).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.consumer import UploadConsumer
from deploy.replica import TaggerModel
from deploy.runtime import replica_env
from deploy.settings import ServeSettings, metrics_dir

APP_NAME = "danmul"


# -- assembling the application ----------------------------------------------------------------------------
def build_app(s: ServeSettings, gpus_available: bool = False):
    from deploy.http import TaggerAPI

    env = {"env_vars": replica_env(s)}
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
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options={"num_cpus": s.replica_cpus, "num_gpus": gpus, "runtime_env": env},
    ).bind(s.checkpoint, s.endpoint_url, s.device, max(1, int(s.replica_cpus)))  # fmt: skip
    consumer_settings = {k: v for k, v in asdict(s).items() if k not in MODEL_ONLY}
    consumer = UploadConsumer.options(
        num_replicas=s.consumers, **quiet, graceful_shutdown_timeout_s=30, health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ray_actor_options={"num_cpus": 0.25, "runtime_env": env},
    ).bind(model, consumer_settings)  # fmt: skip
    # /health must answer while slow or busy clients hold their requests: the replica admits more requests
    # than it works on at once (the rest wait in the API's own limiter, which /health bypasses), and the
    # proxy queues a bounded number beyond that (a flood is refused there, not queued without end)
    api_ongoing = s.http_max_concurrency + 16
    return TaggerAPI.options(**quiet, max_ongoing_requests=api_ongoing, max_queued_requests=4 * api_ongoing,
                             ray_actor_options={"num_cpus": 0.1, "runtime_env": env}).bind(model, consumer, asdict(s))


# A model or consumer replica that died (an OOM kill, a crash in native code) is replaced once Serve's
# health check finds it gone: every 2 s instead of Serve's 10, so its share of the stream waits seconds,
# not ten (a consumer's check also fails when its loop stopped).
HEALTH_CHECK_PERIOD_S = 2.0

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


def http_options(s: ServeSettings) -> dict:
    """Serve's proxy options: an end-to-end bound on every request (the body's read deadline plus a model
    call, with room for queueing); past it the proxy answers 408 itself."""
    return {"host": s.http_host, "port": s.http_port,
            "request_timeout_s": s.http_read_timeout_s + s.model_timeout_s + 30}


def serve_config(s: ServeSettings) -> dict:
    """A Serve config file (``serve deploy`` / ``serve run`` / a RayService's ``serveConfigV2``) for these
    settings. Secrets are never written: a password in the Redis URL is dropped, and the tagger reads it
    from ``REDIS_PASSWORD`` (or the whole URL from ``DANMUL_REDIS_URL``) where it runs."""
    from ingest.queue import without_password

    args = {**asdict(s), "redis": without_password(s.redis)}
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(s),
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "deploy.app:app_builder",
                          "args": args}],
    }  # fmt: skip


def deploy(s: ServeSettings, blocking: bool = False) -> DeploymentHandle:
    """Start (or update) the application on the connected Ray cluster; returns the API's handle."""
    from dashboards.metrics import remove_dead_files

    path = metrics_dir(s.metrics_port)
    os.makedirs(path, exist_ok=True)
    remove_dead_files(path)  # samples of an earlier run's processes
    serve.start(http_options=http_options(s))
    return serve.run(build_app(s, _cluster_has_gpus()), name=APP_NAME, route_prefix="/", blocking=blocking)


def undeploy() -> None:
    """Stop the application gracefully: consumers drain, unfinished uploads stay pending."""
    serve.delete(APP_NAME)
