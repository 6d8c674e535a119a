"""Dashboards and alert rules: the committed JSON is what the generator makes, the rules pass promtool's
own checks and unit tests (each alert fires when it should and stays quiet when it should not), and
every metric any panel or rule uses is one the code exports (read from the live registry)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from dashboards import grafana

HERE = os.path.join(os.path.dirname(__file__), "..", "..", "dashboards")
METRIC = re.compile(r"\b(danmul_[a-z0-9_]+)")


def exported_names() -> set[str]:
    """Every sample name the code can export, from prometheus-client's registry."""
    from prometheus_client import REGISTRY

    import dashboards.metrics  # noqa: F401  (defines every danmul_* metric)

    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("danmul_"):
            continue
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def dashboard_queries() -> list[str]:
    return [t["expr"] for build in grafana.DASHBOARDS.values() for p in build()["panels"] for t in p["targets"]]


def rules() -> list[dict]:
    with open(os.path.join(HERE, "alerts.yml")) as f:
        return [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


def rule_queries() -> list[str]:
    return [r["expr"] for r in rules()]


def test_committed_dashboards_are_the_generated_ones():
    for name, build in grafana.DASHBOARDS.items():
        with open(os.path.join(HERE, name)) as f:
            assert f.read() == grafana.render(build), f"{name} is stale: run python -m dashboards.grafana"


def test_dashboards_have_a_datasource_variable_and_unique_panels():
    for build in grafana.DASHBOARDS.values():
        d = build()
        assert d["templating"]["list"][0]["type"] == "datasource"
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and all(p["datasource"]["uid"] == "${datasource}" for p in d["panels"])
        assert all(p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in d["panels"])


def test_every_metric_used_is_exported():
    exported = exported_names()
    assert {"danmul_uploads_total", "danmul_end_to_end_seconds_bucket", "danmul_queue_lag"} <= exported
    for expr in dashboard_queries() + rule_queries():
        used = set(METRIC.findall(expr))
        assert used and used <= exported, f"{expr}: {sorted(used - exported)} not exported"


def test_rules_pass_promtool_check_and_unit_tests():
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: run `make setup` (it installs the prometheus package)")
    check = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=HERE, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "5 rules found" in check.stdout
    tests = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=HERE, capture_output=True,
                           text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_every_alert_has_a_test_that_fires_and_one_that_stays_quiet():
    with open(os.path.join(HERE, "alerts_test.yml")) as f:
        cases = [c for t in yaml.safe_load(f)["tests"] for c in t["alert_rule_test"]]
    for name in {r["alert"] for r in rules()}:
        fired = [c for c in cases if c["alertname"] == name and c["exp_alerts"]]
        quiet = [c for c in cases if c["alertname"] == name and not c["exp_alerts"]]
        assert fired and quiet, name
