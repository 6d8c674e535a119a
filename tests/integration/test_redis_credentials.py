"""Credentials as an operator sets them up: a Redis ACL user named in the URL (``redis://danmul@host``)
with the password from ``REDIS_PASSWORD`` (a Kubernetes Secret), the shipped way. Wrong credentials stop
``danmul serve`` at start-up with a clear message; credentials that stop working later make ``/health``
fail with the reason (not an endless silent retry), and uploads flow again once they work."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis
import requests
from local_cluster import own_ray

from ingest.queue import Keys, enqueue
from ray_jobs.local_redis import RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PASSWORD = "s3cret-from-a-secret"
ACL = ["--user", "default", "off", "--user", "danmul", "on", f">{PASSWORD}", "~danmul:*", "&*", "+@all"]


@pytest.fixture
def acl_redis(tmp_path):
    server = RedisServer(str(tmp_path), args=ACL, username="danmul", password=PASSWORD)
    server.start()
    yield server
    server.stop()


def test_wrong_password_stops_danmul_serve_at_start_up(acl_redis, tiny_checkpoint):
    env = {**os.environ, "REDIS_PASSWORD": "wrong"}
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "serve", "--checkpoint", tiny_checkpoint, "--redis",
         f"redis://danmul@127.0.0.1:{acl_redis.port}/0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refused the credentials" in proc.stderr and "REDIS_PASSWORD" in proc.stderr
    assert "wrong" not in proc.stderr + proc.stdout  # the password is never printed


def test_credentials_from_the_environment_then_revoked_then_restored(acl_redis, tiny_checkpoint, tiny_rows):
    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings

    os.environ["REDIS_PASSWORD"] = PASSWORD  # before Ray starts: its workers inherit it, as pods do
    admin = redis.Redis(port=acl_redis.port, username="danmul", password=PASSWORD)
    keys = Keys()
    port = free_port()
    s = ServeSettings(checkpoint=tiny_checkpoint, redis=f"redis://danmul@127.0.0.1:{acl_redis.port}/0",
                      http_port=port, metrics_port=free_port())
    health = f"http://127.0.0.1:{port}/health"

    def results() -> int:
        return admin.xlen(keys.results)

    def wait(predicate, timeout=120):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.5)

    try:
        with own_ray():  # a Ray started now: its workers inherit the variable
            deploy(s)
            for i in range(10):
                enqueue(admin, keys, i, image=tiny_rows[i]["image"])
            wait(lambda: results() == 10)
            assert requests.get(health, timeout=30).status_code == 200

            admin.acl_setuser("danmul", enabled=True, reset_passwords=True, passwords=["+rotated"],
                              keys=["danmul:*"], channels=["*"], commands=["+@all"])  # fmt: skip
            admin = redis.Redis(port=acl_redis.port, username="danmul", password="rotated")
            admin.client_kill_filter(_type="normal", skipme=True)  # the tagger must log in again, and cannot
            for i in range(10, 20):
                enqueue(admin, keys, i, image=tiny_rows[i]["image"])
            def unhealthy_because() -> str:
                answer = requests.get(health, timeout=30)
                return answer.json().get("error", "") if answer.status_code == 503 else ""

            # the killed connection may first read as "unavailable (ConnectionError)"; logging in again is
            # what the new password refuses, and /health must come to say so (and never show a password)
            wait(lambda: "refused the credentials" in unhealthy_because())
            body = requests.get(health, timeout=30).json()
            assert "refused the credentials" in body["error"] and PASSWORD not in str(body)
            assert results() == 10

            admin.acl_setuser("danmul", enabled=True, reset_passwords=True, passwords=[f"+{PASSWORD}"],
                              keys=["danmul:*"], channels=["*"], commands=["+@all"])  # fmt: skip
            wait(lambda: results() == 20)
            wait(lambda: requests.get(health, timeout=30).status_code == 200)
            undeploy()
    finally:
        os.environ.pop("REDIS_PASSWORD", None)
