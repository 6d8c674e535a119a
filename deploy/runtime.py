"""What every process of the streaming tagger shares at run time: the environment its replicas get, and
the per-node metrics endpoint. Imports no deployment, so each deployment module can import it."""

from __future__ import annotations

import os
from typing import Any

from deploy.settings import ServeSettings, metrics_dir

# passed on to every replica: object storage's endpoint and region (credentials come from the cluster's
# own environment or identity, never through here)
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def replica_env(s: ServeSettings) -> dict[str, str]:
    env = {"PROMETHEUS_MULTIPROC_DIR": metrics_dir(s.metrics_port), "DANMUL_METRICS_PORT": str(s.metrics_port),
           "DANMUL_METRICS_HOST": s.metrics_host or s.http_host}  # as reachable as the API, unless told
    for name in FORWARDED_ENV:
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def start_metrics() -> Any:
    """This process's metrics module, with the node's endpoint served on the address :func:`replica_env`
    chose (by whichever process binds it first). Imported here, in the replica, because prometheus-client
    reads ``PROMETHEUS_MULTIPROC_DIR`` (set by :func:`replica_env`) when it is first imported."""
    from dashboards import metrics

    metrics.serve_node_metrics(int(os.environ.get("DANMUL_METRICS_PORT", "0")),
                               os.environ.get("DANMUL_METRICS_HOST", "127.0.0.1"))
    return metrics
