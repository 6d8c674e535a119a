"""Everything that brings data in: object storage, the Dan:mul build and synthetic generator, the
shard schema, and (later) the upload-queue protocol on Redis Streams. No Ray here."""
