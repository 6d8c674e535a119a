"""Ray jobs (train, evaluate, backfill, benchmarks) and the ``danmul`` CLI: thin wiring of ``model/``
and ``ingest/`` into Ray."""
