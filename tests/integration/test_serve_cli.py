"""``danmul enqueue`` and ``danmul serve`` as an operator runs them (subprocesses, a real redis-server,
a local Ray started by the command): SIGTERM mid-stream stops gracefully, nothing is acknowledged
without its result, and a second ``danmul serve`` finishes the rest exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from ingest.queue import Keys
from ray_jobs.local_redis import free_port
from ray_jobs.samples import synthetic_dataset, untrained_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.e2e]
DANMUL = [sys.executable, "-m", "ray_jobs.cli"]
KEYS = Keys()
N = 400
SIGINT_THEN_EXEC = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execv(sys.argv[1], sys.argv[1:])")


def stream_id(eid: bytes) -> tuple[int, int]:
    ms, seq = eid.split(b"-")
    return int(ms), int(seq)


def tail(path) -> str:
    with open(path) as f:
        return f.read()[-3000:]


def start_serve(checkpoint: str, redis_url: str, log) -> subprocess.Popen:
    return subprocess.Popen(
        [*DANMUL, "serve", "--checkpoint", checkpoint, "--redis", redis_url, "--http-port", str(free_port()),
         "--metrics-port", str(free_port()), "--max-in-flight", "4", "--max-batch-size", "4", "--claim-idle-s", "5"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


def stop(proc: subprocess.Popen, log_path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = tail(log_path)
    assert rc == 0, out
    assert "stopped" in out


def test_sigterm_mid_stream_then_restart(redis_server, tmp_path):
    data = synthetic_dataset(str(tmp_path / "data"), characters=6, images=300, image_size=32, seed=4, workers=1)
    ckpt = untrained_checkpoint(data, str(tmp_path / "model"), image_size=32)
    for _ in range(2):  # the same posts twice: each entry is an upload of its own
        proc = subprocess.run([*DANMUL, "enqueue", "--redis", redis_server.url, "--data", data, "--split", "train",
                               "--limit", str(N // 2)], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert f"enqueued {N // 2} uploads" in proc.stdout
    c = redis.Redis(port=redis_server.port)
    ids = [eid for eid, _ in c.xrange(KEYS.uploads)]
    assert len(ids) == N

    log_path = tmp_path / "serve1.log"
    with open(log_path, "w") as log:
        serve = start_serve(ckpt, redis_server.url, log)
        deadline = time.monotonic() + 180
        while c.xlen(KEYS.results) < 10:
            assert serve.poll() is None and time.monotonic() < deadline, tail(log_path)
            time.sleep(0.05)
        stop(serve, log_path)
    done_first = c.xlen(KEYS.results)
    assert 10 <= done_first < N  # stopped mid-stream
    # nothing acknowledged without a result: every acknowledged entry has its result entry
    pending = {p["message_id"] for p in c.xpending_range(KEYS.uploads, "danmul-taggers", "-", "+", 1000)}
    answered = {e[b"upload_id"] for _, e in c.xrange(KEYS.results)}
    group = c.xinfo_groups(KEYS.uploads)[0]
    delivered = {eid for eid in ids if stream_id(eid) <= stream_id(group["last-delivered-id"])}
    assert delivered - pending == answered

    log_path = tmp_path / "serve2.log"
    with open(log_path, "w") as log:
        serve = start_serve(ckpt, redis_server.url, log)
        deadline = time.monotonic() + 300
        while c.xlen(KEYS.results) < N:
            assert serve.poll() is None and time.monotonic() < deadline, tail(log_path)
            time.sleep(0.1)
        time.sleep(1)
        stop(serve, log_path)
    answered = [e[b"upload_id"] for _, e in c.xrange(KEYS.results)]
    assert len(answered) == N and set(answered) == set(ids)
    assert c.xinfo_groups(KEYS.uploads)[0]["pending"] == 0


def test_serve_config_written_by_the_cli_runs_with_ray_serve(redis_server, tiny_checkpoint, tiny_rows, tmp_path):
    """`danmul serve --write-config` then Ray's own `serve run CONFIG`: the app builds from the config,
    answers HTTP and tags uploads from Redis."""
    import requests

    from ingest.queue import enqueue

    http_port = free_port()
    config = tmp_path / "serve.yaml"
    proc = subprocess.run([*DANMUL, "serve", "--checkpoint", tiny_checkpoint, "--redis", redis_server.url,
                           "--http-port", str(http_port), "--metrics-port", str(free_port()),
                           "--write-config", str(config)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    c = redis.Redis(port=redis_server.port)
    for r in tiny_rows[:20]:
        enqueue(c, KEYS, r["post_id"], image=r["image"], tags=r["tags"])
    log_path = tmp_path / "serve-run.log"
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    with open(log_path, "w") as log:
        # Ctrl-C ends it as at a terminal, even where the tests run from a shell that ignores SIGINT (a
        # background job's children inherit that, and `serve run` would sit out the wait below)
        run = subprocess.Popen([sys.executable, "-c", SIGINT_THEN_EXEC, serve_cli, "run", str(config)], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while c.xlen(KEYS.results) < 20:
                assert run.poll() is None and time.monotonic() < deadline, tail(log_path)
                time.sleep(0.5)
            health = requests.get(f"http://127.0.0.1:{http_port}/health", timeout=30).json()
            assert health["status"] == "ok"
        finally:
            run.send_signal(signal.SIGINT)
            try:
                run.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    assert c.xlen(KEYS.results) == 20 and c.xlen(KEYS.dead) == 0
