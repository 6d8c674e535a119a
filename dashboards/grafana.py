"""Grafana dashboards as code: ``python -m dashboards.grafana`` writes ``dashboards/*.json``.

Each dashboard has a Prometheus datasource variable (``${datasource}``), so it imports into any Grafana
and points at whichever Prometheus scrapes danmul. Panels use only metrics ``dashboards/metrics.py`` exports
(the tests check every query against the live registry, and the committed JSON against this file).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
RAY_DASHBOARD_URL = "http://127.0.0.1:8265"


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
          width: int = 12, description: str = "") -> dict[str, Any]:
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                    for i, (expr, legend) in enumerate(targets)],
        "gridPos": {"w": width, "h": 8},
    }  # fmt: skip


def dashboard(uid: str, title: str, panels: list[dict], description: str) -> dict[str, Any]:
    x = y = 0
    for i, p in enumerate(panels):  # left to right, then down
        w = p["gridPos"]["w"]
        if x + w > 24:
            x, y = 0, y + 8
        p["gridPos"].update({"x": x, "y": y})
        p["id"] = i + 1
        x += w
    return {
        "uid": uid, "title": title, "description": description, "tags": ["danmul"], "schemaVersion": 39,
        "timezone": "browser", "refresh": "30s", "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}}]},
        "links": [{"title": "Ray dashboard (cluster health, Serve, Data)", "type": "link",
                   "url": RAY_DASHBOARD_URL, "targetBlank": True}],
        "panels": panels,
    }  # fmt: skip


def q(quantile: float, metric: str, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket[5m])))"


def streaming() -> dict[str, Any]:
    return dashboard("danmul-streaming", "danmul / streaming tagger", [
        panel("Uploads/s by outcome", [("sum by (outcome) (rate(danmul_uploads_total[5m]))", "{{outcome}}")],
              "reqps"),
        panel("End-to-end latency", [(q(0.5, "danmul_end_to_end_seconds"), "p50"),
                                     (q(0.99, "danmul_end_to_end_seconds"), "p99")], "s",
              description="From the upload's stream entry to its result or dead letter"),
        panel("Stage latency p99", [(q(0.99, "danmul_stage_seconds", "stage"), "{{stage}}")], "s"),
        panel("Queue lag and pending", [("max by (group) (danmul_queue_lag)", "lag {{group}}"),
                                        ("max by (group) (danmul_queue_pending)", "pending {{group}}")]),
        panel("Dead letters/s by reason", [("sum by (reason) (rate(danmul_dead_letters_total[5m]))",
                                            "{{reason}}")], "reqps"),
        panel("Retries/s by reason", [("sum by (reason) (rate(danmul_upload_retries_total[5m]))", "{{reason}}")],
              "reqps"),
        panel("Batch size (mean)", [("sum(rate(danmul_batch_size_sum[5m])) / sum(rate(danmul_batch_size_count[5m]))",
                                     "images per batch")], width=8),
        panel("Replicas and consumers", [("sum by (model) (danmul_model_replicas)", "model replicas {{model}}"),
                                         ("sum(danmul_consumers)", "consumers"),
                                         ("sum(danmul_in_flight)", "uploads in flight")], width=8),
        panel("Model version", [("max by (model, image_model) (danmul_model_info)", "{{model}} {{image_model}}")],
              kind="table", width=8),
        panel("Character confidence (top-1)", [(q(0.5, "danmul_character_confidence"), "median"),
                                               (q(0.1, "danmul_character_confidence"), "p10")], "percentunit"),
        panel("Abstentions/s", [("sum(rate(danmul_abstained_total[5m]))", "abstained")], "reqps"),
        panel("HTTP API requests/s", [("sum by (endpoint, code) (rate(danmul_http_requests_total[5m]))",
                                       "{{endpoint}} {{code}}")], "reqps"),
        panel("HTTP API p99", [(q(0.99, "danmul_http_request_seconds", "endpoint"), "{{endpoint}}")], "s"),
    ], "Uploads from Redis through the consumers and model replicas back to Redis")  # fmt: skip


def backfill() -> dict[str, Any]:
    return dashboard("danmul-backfill", "danmul / backfill", [
        panel("Images/s", [("sum by (outcome) (rate(danmul_backfill_images_total[5m]))", "{{outcome}}"),
                           ("max(danmul_backfill_images_per_second)", "since the start")], "reqps"),
        panel("Progress", [("sum by (outcome) (danmul_backfill_images_total)", "{{outcome}}")]),
        panel("Error share", [("sum(rate(danmul_backfill_images_total{outcome=\"error\"}[5m])) / "
                               "clamp_min(sum(rate(danmul_backfill_images_total[5m])), 1e-9)", "errors")],
              "percentunit", width=24),
    ], "danmul backfill jobs (each driver serves its counters on --metrics-port)")  # fmt: skip


def training() -> dict[str, Any]:
    return dashboard("danmul-training", "danmul / training", [
        panel("Loss", [("max(danmul_train_loss)", "train loss")]),
        panel("Validation top-1", [("max by (mode) (danmul_train_val_top1)", "{{mode}}")], "percentunit"),
        panel("Samples/s", [("max(danmul_train_samples_per_second)", "all workers")], width=8),
        panel("Curriculum: tag drop rate", [("max(danmul_train_text_drop_rate)", "drop")], "percentunit",
              width=8),
        panel("Progress", [("max(danmul_train_epoch)", "epoch"), ("max(danmul_train_step)", "step")], width=8),
    ], "danmul train: served by the rank-0 worker on --metrics-port; Ray Train's own view is in Ray's dashboard")


DASHBOARDS = {"streaming.json": streaming, "backfill.json": backfill, "training.json": training}


def render(build) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(out: str = os.path.dirname(__file__)) -> int:
    for name, build in DASHBOARDS.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(render(build))
        print(f"wrote {os.path.join(out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
