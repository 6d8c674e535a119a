"""A real Prometheus (the OS package, on a free port) scrapes a running streaming tagger fed with uploads,
good and bad, and HTTP requests; every query of the streaming dashboard returns data, and the alert
rules load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import redis
import requests

from dashboards import grafana
from ingest.queue import Keys, enqueue
from ray_jobs.local_redis import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HERE = os.path.join(os.path.dirname(__file__), "..", "..", "dashboards")


def prom_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_pipeline_and_every_streaming_panel_has_data(ray_cluster, tiny_checkpoint, tiny_rows,
                                                                              redis_server, tmp_path):
    from ray import serve

    from deploy.app import deploy, undeploy
    from deploy.settings import ServeSettings

    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make setup` (it installs the OS package)")
    metrics_port, prom_port, http_port = free_port(), free_port(), free_port()
    shutil.copy(os.path.join(HERE, "alerts.yml"), tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [alerts.yml]
scrape_configs:
  - job_name: danmul
    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]
""")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        s = ServeSettings(checkpoint=tiny_checkpoint, redis=redis_server.url, http_port=http_port,
                          metrics_port=metrics_port, claim_idle_s=1, max_deliveries=2, allowed_buckets="offline",
                          endpoint_url=f"http://127.0.0.1:{free_port()}")  # object storage that is down
        deploy(s)
        c = redis.Redis(port=redis_server.port)
        keys = Keys()
        for i, r in enumerate(tiny_rows * 2):
            enqueue(c, keys, 30_000 + i, image=r["image"], tags=r["tags"] if i % 2 else None)
        enqueue(c, keys, 1, image=b"not an image")  # a dead letter
        enqueue(c, keys, 2, image_uri="s3://offline/nothing.jpg")  # retried, then dead-lettered
        base = f"http://127.0.0.1:{http_port}"
        assert requests.post(f"{base}/evaluate", files={"file": ("a.jpg", tiny_rows[0]["image"])}, timeout=60).ok
        assert requests.post(f"{base}/v1/tag", data=tiny_rows[0]["image"], timeout=60,
                             headers={"content-type": "image/jpeg"}).ok
        total = 2 * len(tiny_rows) + 2
        deadline = time.monotonic() + 180
        while c.xlen(keys.results) + c.xlen(keys.dead) < total:
            assert time.monotonic() < deadline, "the pipeline did not finish"
            time.sleep(0.5)
        time.sleep(6)  # a few more scrapes, so rates have two points

        up = prom_query(prom_port, 'up{job="danmul"}')
        assert up and up[0]["value"][1] == "1"
        empty = []
        for p in grafana.streaming()["panels"]:
            for t in p["targets"]:
                if not prom_query(prom_port, t["expr"]):
                    empty.append(f"{p['title']}: {t['expr']}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        tagged = prom_query(prom_port, 'sum(danmul_uploads_total{outcome="tagged"})')
        assert float(tagged[0]["value"][1]) == total - 2
        rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=10).read())
        loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert {"DanmulQueueLagGrowing", "DanmulNoModelReplica"} <= loaded
        undeploy()
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        serve.shutdown()
