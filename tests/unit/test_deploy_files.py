"""The deployment files: the KubeRay manifests parse, name an import path and CLI commands that exist,
with settings the code accepts, and ask for the resources they need; the Serve config the CLI writes
builds the application."""

from __future__ import annotations

import dataclasses
import importlib
import os
import shlex

import yaml

from deploy.settings import ServeSettings
from ray_jobs import config as cfgmod
from ray_jobs.cli import build_parser

KUBERAY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "kuberay")


def manifest(name: str) -> list[dict]:
    with open(os.path.join(KUBERAY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpu_groups(cluster: dict) -> list[dict]:
    return [g for g in cluster.get("workerGroupSpecs", [])
            if any("nvidia.com/gpu" in c["resources"]["requests"] for c in g["template"]["spec"]["containers"])]


def test_rayservice_serves_the_app_builder_with_valid_settings_on_gpus():
    [svc] = manifest("rayservice.yaml")
    assert svc["kind"] == "RayService"
    serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    [app] = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    assert set(app["args"]) <= fields, set(app["args"]) - fields
    settings = ServeSettings(**app["args"])
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] and gpu_groups(cluster)
    assert settings.replica_gpus and settings.max_replicas <= sum(g["maxReplicas"] for g in gpu_groups(cluster))
    for c in containers(cluster):  # metrics exported where Prometheus looks; secrets, not literals
        ports = {p["containerPort"] for p in c["ports"]}
        assert {settings.metrics_port, 8080} <= ports
        assert any(e["name"] == "REDIS_PASSWORD" and "secretKeyRef" in e["valueFrom"] for e in c["env"])
    assert serve_config["http_options"]["host"] == "0.0.0.0" and settings.http_host == "0.0.0.0"


def test_rayjobs_run_real_cli_commands_on_gpus():
    parser = build_parser()
    for name, command in (("rayjob-train.yaml", "train"), ("rayjob-backfill.yaml", "backfill")):
        [job] = manifest(name)
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "danmul" and argv[1] == command
        args = parser.parse_args(argv[1:])  # exits (fails the test) on an unknown option
        settings_cls = {"train": "ray_jobs.train:TrainConfig", "backfill": "ray_jobs.backfill:BackfillConfig"}[command]
        module, attr = settings_cls.split(":")
        cfgmod.resolve(getattr(importlib.import_module(module), attr), args)  # required settings all given
        assert gpu_groups(job["spec"]["rayClusterSpec"])
        assert all(any(e.get("secretRef", {}).get("name") == "danmul-s3" for e in c["envFrom"])
                   for c in containers(job["spec"]["rayClusterSpec"]))


def test_cli_writes_a_serve_config_that_builds_the_app(tmp_path):
    from ray.serve import Application

    from deploy.app import app_builder
    from ray_jobs.cli import main

    out = tmp_path / "serve.yaml"
    assert main(["serve", "--checkpoint", "s3://m/model", "--redis", "redis://r:6379/0", "--max-batch-size", "16",
                 "--write-config", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    [app] = config["applications"]
    assert app["args"]["checkpoint"] == "s3://m/model" and app["args"]["max_batch_size"] == 16
    assert isinstance(app_builder(app["args"]), Application)
    os.environ["DANMUL_REDIS_URL"] = "redis://from-secret:6379/0"
    try:
        args = {k: v for k, v in app["args"].items() if k != "redis"}
        app_builder(args)  # the URL from the environment fills the missing setting
    finally:
        del os.environ["DANMUL_REDIS_URL"]
