"""Settings of the streaming tagger (``danmul serve``), importable without Ray: defaults here, then a YAML
file, then flags (``ray_jobs.config``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class ServeSettings:
    checkpoint: str = field(metadata={"help": "model checkpoint folder or s3:// URI (an exported OUT/NAME/model)"})
    redis: str = field(default="redis://127.0.0.1:6379/0", metadata={
        "help": "Redis URL (redis:// or rediss:// for TLS); user and password may come from REDIS_USERNAME and "
                "REDIS_PASSWORD instead (kept off command lines and config files)"})
    redis_ca_file: str | None = field(default=None, metadata={
        "help": "CA bundle that signs the Redis server's TLS certificate (rediss://; default: REDIS_CA_FILE, else "
                "the system's)"})
    redis_cluster: bool = field(default=False, metadata={
        "help": "Redis is a Redis Cluster (the prefix must then carry a hash tag, e.g. {danmul}:)"})
    allow_eviction: bool = field(default=False, metadata={
        "help": "run even when Redis may evict keys (maxmemory-policy allkeys-*): uploads could vanish"})
    allow_other_groups: bool = field(default=False, metadata={
        "help": "run even when another consumer group reads the uploads stream (meant for a reader that is not a "
                "tagger: trimming waits for it; two taggers' groups on one prefix share its ledger)"})
    prefix: str = field(default="danmul:", metadata={"help": "key prefix of the streams and result hashes"})
    group: str = field(default="danmul-taggers", metadata={"help": "consumer group on the uploads stream"})
    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (default: AWS_ENDPOINT_URL)"})
    local_roots: str = field(default="", metadata={
        "help": "comma-separated folders uploads may name as image_uri (default: no local paths)"})
    allowed_buckets: str = field(default="", metadata={
        "help": "comma-separated S3 buckets uploads may name as image_uri (default: the checkpoint's bucket, if "
                "the checkpoint is on S3; * for any bucket the credentials reach)"})
    allow_http: bool = field(default=False, metadata={
        "help": "fetch http(s):// image URIs (public addresses only, no redirects to private ones)"})
    fetch_timeout_s: float = field(default=10.0, metadata={  # ingest.fetch.FETCH_TIMEOUT_S
        "help": "one image fetch by URI (s3://, a local path, http(s)://) that takes longer in all is abandoned and "
                "the upload left for another delivery (attempts reason fetch_timeout)"})
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
    max_in_flight_bytes: int = field(default=256 << 20, metadata={
        "help": "bytes of upload entries one consumer holds at once (an entry over max_entry_bytes counts as 0: "
                "it is dead-lettered unread)"})
    max_entry_bytes: int = field(default=(32 << 20) + (64 << 10), metadata={
        "help": "largest upload entry read (all fields); a larger one is dead-lettered as too_large"})
    max_deliveries: int = field(default=5, metadata={"help": "deliveries before an upload is dead-lettered"})
    model_timeout_s: float = field(default=30.0, metadata={
        "help": "a model call that takes longer is abandoned and the upload left for another delivery"})
    result_ttl_s: int = field(default=0, metadata={"help": "expire result hashes after this many s (0: never)"})
    stream_retention_s: float = field(default=300.0, metadata={
        "help": "acknowledged uploads kept in the uploads stream this long before the tagger trims them "
                "(never an undelivered or pending one)"})
    trim_interval_s: float = field(default=10.0, metadata={"help": "how often the uploads stream is trimmed"})
    http_host: str = field(default="127.0.0.1", metadata={"help": "HTTP API address (0.0.0.0 for all)"})
    http_port: int = field(default=8000, metadata={"help": "HTTP API port"})
    max_request_bytes: int = field(default=64 << 20, metadata={"help": "largest HTTP request body accepted"})
    api_keys_file: str | None = field(default=None, metadata={
        "help": "file of API keys, one per line: every endpoint but GET /health then needs one (Authorization: "
                "Bearer KEY, or Danbooru's HTTP basic auth with the key as password)"})
    http_read_timeout_s: float = field(default=10.0, metadata={
        "help": "a request whose body takes longer to arrive is answered 408"})
    http_max_concurrency: int = field(default=32, metadata={
        "help": "requests one API replica works on at once; more wait, then get 503 (GET /health always answers)"})
    metrics_port: int = field(default=9500, metadata={"help": "per-node Prometheus endpoint (0: off)"})
    metrics_host: str | None = field(default=None, metadata={
        "help": "address the per-node metrics endpoint listens on (default: --http-host's; 0.0.0.0 for a "
                "Prometheus on another machine)"})
    device: str | None = field(default=None, metadata={"help": "model device (default: cuda when available)"})


    def __post_init__(self) -> None:
        """Refuse settings that could only fail later, naming the setting (a ValueError the CLI prints)."""
        at_least = {"consumers": 0, "min_replicas": 1, "max_replicas": self.min_replicas, "max_batch_size": 1,
                    "top_k": 1, "max_in_flight": 1, "max_in_flight_bytes": 1 << 20, "max_entry_bytes": 1 << 10,
                    "max_deliveries": 1, "result_ttl_s": 0, "max_request_bytes": 1 << 10,
                    "http_max_concurrency": 1, "metrics_port": 0}  # fmt: skip
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer of at least {low}, not {value!r}")
        positive = ("claim_idle_s", "model_timeout_s", "fetch_timeout_s", "trim_interval_s", "http_read_timeout_s",
                    "replica_cpus")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, not {value!r}")
        for name in ("batch_wait_timeout_s", "stream_retention_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"--{name.replace('_', '-')} must be a number of at least 0, not {value!r}")
        for name in ("tag_threshold", "character_threshold"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or not 0.0 <= value <= 1.01):
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], not {value!r}")
        for name in ("http_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be a port number, not {getattr(self, name)!r}")
        if not self.prefix or not self.group:
            raise ValueError("--prefix and --group must not be empty")


def metrics_dir(port: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"danmul-metrics-{port}")
