"""Shared fixtures. Services are real and started by the tests: an S3 API from moto's server mode on
a free local port (no mocked boto3), local folders as object storage."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest
from local_cluster import RAY_CPUS

from ray_jobs.local_redis import RedisServer

# The files that take longest (whole CLI runs, cluster restarts), longest first, as measured on 2 cores:
# `make test` runs two test processes, each given whole files in this order, and a long file started
# last would leave one process working alone at the end. The order changes nothing else.
LONGEST_FIRST = ("integration/test_train.py", "test_cli.py", "integration/test_backfill.py",
                 "integration/test_serve_cli.py", "integration/test_hostile_stream.py", "integration/test_stream.py",
                 "integration/test_chaos.py")  # fmt: skip


def pytest_collection_modifyitems(config, items) -> None:
    """Markers follow the folders: everything under tests/integration talks to real services and is marked
    ``integration``; tests/unit needs none (``make test-fast`` runs it). The longest files run first."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)

    def rank(item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith("/tests/" + name)),
                    len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: within a file, and among the rest, the collected order


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "danmul-test",
    "AWS_SECRET_ACCESS_KEY": "danmul-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto server mode) on 127.0.0.1, for the whole session. Sets the standard AWS
    environment (endpoint and dummy credentials) so code under test finds it the way it would in
    production; restores the environment afterwards."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the test S3 API; returns its ``s3://`` URI."""
    import boto3

    name = f"danmul-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    """Stops the shared local Ray, if one is up, when the session ends."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(_ray_session, s3_endpoint) -> Iterator[None]:
    """A local Ray shared by every module that uses this fixture: the first starts it and the session's end
    stops it (each start and stop costs seconds of both cores). Serve is shut down after each module, so
    every module starts from no applications, and fresh replicas with fresh counters. The S3 API is up
    first: Ray's workers inherit the environment that points at it, whichever module starts Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory) -> Iterator[RedisServer]:
    """A redis-server shared by one test module's tests (each uses keys of its own)."""
    with RedisServer(str(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test (started, then stopped and its files removed with tmp_path)."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make setup` (it installs the OS package)")
    server = RedisServer(str(tmp_path))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- a tiny synthetic dataset and an untrained tiny model, shared by the streaming and backfill tests ---------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    """6 characters, 150 images at 32 px (train/val/test)."""
    from ray_jobs.samples import synthetic_dataset

    uri = str(tmp_path_factory.mktemp("data") / "danmul")
    return synthetic_dataset(uri, characters=6, images=150, image_size=32, seed=3, workers=1)


@pytest.fixture(scope="module")
def tiny_rows(tiny_data) -> list[dict]:
    from ray_jobs.samples import rows

    return rows(tiny_data)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_data, tmp_path_factory) -> str:
    """An untrained tiny model for the dataset (the behaviour under test does not depend on its weights)."""
    from ray_jobs.samples import untrained_checkpoint

    return untrained_checkpoint(tiny_data, str(tmp_path_factory.mktemp("ckpt") / "model"), image_size=32)
