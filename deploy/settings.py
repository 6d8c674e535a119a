"""Settings of the streaming tagger (``danmul serve``), importable without Ray: defaults here, then a YAML
file, then flags (``ray_jobs.config``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class ServeSettings:
    checkpoint: str = field(metadata={"help": "model checkpoint folder or s3:// URI (an exported OUT/NAME/model)"})
    redis: str = field(default="redis://127.0.0.1:6379/0", metadata={
        "help": "Redis URL (redis:// or rediss:// for TLS); the password may come from REDIS_PASSWORD instead"})
    prefix: str = field(default="danmul:", metadata={"help": "key prefix of the streams and result hashes"})
    group: str = field(default="danmul-taggers", metadata={"help": "consumer group on the uploads stream"})
    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (default: AWS_ENDPOINT_URL)"})
    local_roots: str = field(default="", metadata={
        "help": "comma-separated folders uploads may name as image_uri (default: no local paths)"})
    allow_http: bool = field(default=False, metadata={"help": "fetch http(s):// image URIs (off: SSRF risk)"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: start a local one)"})
    consumers: int = field(default=1, metadata={"help": "queue consumer replicas"})
    min_replicas: int = field(default=1, metadata={"help": "model replicas at least"})
    max_replicas: int = field(default=1, metadata={"help": "model replicas at most (autoscaling when > min)"})
    replica_cpus: float = field(default=1.0, metadata={"help": "CPUs per model replica (decoding runs there)"})
    replica_gpus: float | None = field(default=None, metadata={
        "help": "GPUs per model replica (default: 1 when the cluster has GPUs, else 0)"})
    max_batch_size: int = field(default=32, metadata={"help": "dynamic batching: images per batch at most"})
    batch_wait_timeout_s: float = field(default=0.01, metadata={"help": "dynamic batching: longest wait to fill"})
    tag_threshold: float | None = field(default=None, metadata={
        "help": "one threshold for every tag (default: the checkpoint's calibrated ones)"})
    character_threshold: float | None = field(default=None, metadata={
        "help": "one abstention threshold for every character (default: calibrated)"})
    top_k: int = field(default=5, metadata={"help": "characters listed per result"})
    max_in_flight: int = field(default=64, metadata={
        "help": "uploads one consumer works on at once (backpressure: nothing more is read)"})
    claim_idle_s: float = field(default=60.0, metadata={
        "help": "an upload pending this long (its consumer died) is reclaimed by another"})
    max_deliveries: int = field(default=5, metadata={"help": "deliveries before an upload is dead-lettered"})
    result_ttl_s: int = field(default=0, metadata={"help": "expire result hashes after this many s (0: never)"})
    http_host: str = field(default="127.0.0.1", metadata={"help": "HTTP API address (0.0.0.0 for all)"})
    http_port: int = field(default=8000, metadata={"help": "HTTP API port"})
    max_request_bytes: int = field(default=64 << 20, metadata={"help": "largest HTTP request body accepted"})
    metrics_port: int = field(default=9500, metadata={"help": "per-node Prometheus endpoint (0: off)"})
    device: str | None = field(default=None, metadata={"help": "model device (default: cuda when available)"})


def metrics_dir(port: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"danmul-metrics-{port}")
