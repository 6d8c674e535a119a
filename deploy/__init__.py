"""The Ray Serve application (queue consumer, batched model replicas, HTTP API) and deployment files."""
