"""The deployment files: the KubeRay manifests parse, name an import path and CLI commands that exist,
with settings the code accepts, and ask for the resources they need; the Serve config the CLI writes
builds the application. And they are safe to run: Ray's unauthenticated dashboard (job submission) is
fenced by a NetworkPolicy, every container runs unprivileged from a versioned image, the Dockerfile
pins its base and drops root."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex

import pytest
import yaml

from deploy.settings import ServeSettings
from ray_jobs import config as cfgmod
from ray_jobs.cli import build_parser

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
KUBERAY = os.path.join(DEPLOY, "kuberay")
RAY_MANIFESTS = {"rayservice.yaml": "RayService", "rayjob-train.yaml": "RayJob", "rayjob-backfill.yaml": "RayJob"}
DASHBOARD_PORT, DASHBOARD_AGENT_PORT, GCS_PORT = 8265, 52365, 6379
PROMETHEUS_PORTS = {8080, 9500}


def manifest(name: str) -> list[dict]:
    with open(os.path.join(KUBERAY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def the(name: str, kind: str) -> dict:
    """The one document of ``kind`` in a manifest file."""
    [doc] = [d for d in manifest(name) if d["kind"] == kind]
    return doc


def cluster_of(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig" if doc["kind"] == "RayService" else "rayClusterSpec"]


def pod_templates(doc: dict) -> list[dict]:
    """Every pod template a Ray manifest makes KubeRay create: head, worker groups, RayJob submitter."""
    cluster = cluster_of(doc)
    templates = [g["template"] for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates.append(doc["spec"]["submitterPodTemplate"])
    return templates


def ray_pod_templates(doc: dict) -> list[dict]:
    cluster = cluster_of(doc)
    return [g["template"] for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]]


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpu_groups(cluster: dict) -> list[dict]:
    return [g for g in cluster.get("workerGroupSpecs", [])
            if any("nvidia.com/gpu" in c["resources"]["requests"] for c in g["template"]["spec"]["containers"])]


def test_rayservice_serves_the_app_builder_with_valid_settings_on_gpus():
    svc = the("rayservice.yaml", "RayService")
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


def test_the_metrics_endpoint_listens_where_the_api_does_unless_told():
    from deploy.runtime import replica_env

    host = lambda **kw: replica_env(ServeSettings(checkpoint="m", **kw))["DANMUL_METRICS_HOST"]  # noqa: E731
    assert host() == "127.0.0.1"  # a local API: local metrics
    assert host(http_host="0.0.0.0") == "0.0.0.0"  # the RayService: Prometheus scrapes the pods
    assert host(metrics_host="0.0.0.0") == "0.0.0.0"  # a local API, metrics for a Prometheus elsewhere
    assert build_parser().parse_args(["serve", "--metrics-host", "0.0.0.0"]).metrics_host == "0.0.0.0"


def test_rayjobs_run_real_cli_commands_on_gpus():
    parser = build_parser()
    for name, command in (("rayjob-train.yaml", "train"), ("rayjob-backfill.yaml", "backfill")):
        job = the(name, "RayJob")
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "danmul" and argv[1] == command
        args = parser.parse_args(argv[1:])  # exits (fails the test) on an unknown option
        settings_cls = {"train": "ray_jobs.train_config:TrainConfig",
                        "backfill": "ray_jobs.backfill:BackfillConfig"}[command]
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


def test_write_config_never_writes_the_redis_password(tmp_path, capsys):
    from ray_jobs.cli import main

    out = tmp_path / "serve.yaml"
    url = "rediss://danmul:s3cret-pw@redis.internal:6380/0?password=other-pw&ssl_cert_reqs=required"
    assert main(["serve", "--checkpoint", "s3://m/model", "--redis", url, "--write-config", str(out)]) == 0
    text = out.read_text()
    assert "s3cret-pw" not in text and "other-pw" not in text
    assert yaml.safe_load(text)["applications"][0]["args"]["redis"] == \
        "rediss://danmul@redis.internal:6380/0?ssl_cert_reqs=required"
    assert "REDIS_PASSWORD" in capsys.readouterr().out


# -- safe to run --------------------------------------------------------------------------------------


def labels_of(template: dict) -> dict:
    return (template.get("metadata") or {}).get("labels") or {}


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    match = selector.get("matchLabels", {})
    assert match, "an empty selector matches every pod"
    return all(labels.get(k) == v for k, v in match.items())


def admits_port(rule: dict, port: int) -> bool:
    if not rule.get("ports"):
        return True  # no ports: every port
    for p in rule["ports"]:
        assert isinstance(p["port"], int), f"named ports hide what a rule opens: {p}"
        if p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def ingress_rules(name: str, doc: dict) -> list[dict]:
    """The ingress rules of every NetworkPolicy in the file that selects the Ray pods of ``doc`` (policies add up);
    fails unless every Ray pod is selected by at least one policy that restricts ingress."""
    policies = [d for d in manifest(name) if d["kind"] == "NetworkPolicy"]
    assert all(p["metadata"].get("namespace") == doc["metadata"].get("namespace") for p in policies)
    rules = []
    for template in ray_pod_templates(doc):
        covering = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                    and selects(p["spec"]["podSelector"], labels_of(template))]
        assert covering, f"{name}: a Ray pod template ({labels_of(template)}) is not covered by a NetworkPolicy"
        rules += [r for p in covering for r in p["spec"].get("ingress", [])]
    return rules


def is_operator(peer: dict) -> bool:
    """The KubeRay operator's pods, in one named namespace (not a whole namespace, not any pod)."""
    ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
    pods = peer.get("podSelector", {}).get("matchLabels", {})
    return set(ns) == {"kubernetes.io/metadata.name"} and pods.get("app.kubernetes.io/component") == "kuberay-operator"


def is_own_pod(peer: dict, doc: dict, templates: list[dict]) -> bool:
    """Pods of this deployment only: same namespace, a selector naming this deployment's instance label and
    matching one of ``templates``."""
    if "namespaceSelector" in peer or "ipBlock" in peer or "podSelector" not in peer:
        return False
    instance = labels_of(ray_pod_templates(doc)[0])["app.kubernetes.io/instance"]
    return (peer["podSelector"]["matchLabels"].get("app.kubernetes.io/instance") == instance
            and any(selects(peer["podSelector"], labels_of(t)) for t in templates))


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_ray_dashboard_is_reachable_only_by_its_cluster_and_the_operator(name):
    doc = the(name, RAY_MANIFESTS[name])
    head_params = cluster_of(doc)["headGroupSpec"]["rayStartParams"]
    # KubeRay binds the dashboard to 0.0.0.0 when dashboard-host is not given.
    if head_params.get("dashboard-host", "0.0.0.0") in ("127.0.0.1", "localhost"):
        return  # not on the pod network: nothing to fence (but the operator cannot reach it either)
    rules = ingress_rules(name, doc)
    ray_pods = ray_pod_templates(doc)
    submitter = [doc["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in doc["spec"] else []

    # the Ray pods reach one another on every port (GCS, raylets, object managers, workers)
    assert any(not r.get("ports") and all(any(is_own_pod(p, doc, [t]) for p in r.get("from", [])) for t in ray_pods)
               for r in rules)
    for port, allowed in ((GCS_PORT, "cluster"), (DASHBOARD_PORT, "operator"), (DASHBOARD_AGENT_PORT, "operator")):
        for rule in rules:
            if not admits_port(rule, port):
                continue
            assert rule.get("from"), f"{name}: port {port} open to every source"
            for peer in rule["from"]:
                ok = is_own_pod(peer, doc, ray_pods) or (allowed == "operator" and (
                    is_operator(peer) or (port == DASHBOARD_PORT and is_own_pod(peer, doc, submitter))))
                assert ok, f"{name}: port {port} admits {peer}"

    def admitted(port: int, peer_test) -> bool:
        return any(admits_port(r, port) and any(peer_test(p) for p in r.get("from", [])) for r in rules)

    # the operator submits and watches the job / deploys and watches the Serve app through the dashboard
    assert admitted(DASHBOARD_PORT, is_operator)
    if doc["kind"] == "RayService":
        assert admitted(DASHBOARD_AGENT_PORT, is_operator)
    else:  # KubeRay's submitter pod runs `ray job submit` against the dashboard
        assert submitter and admitted(DASHBOARD_PORT, lambda p: is_own_pod(p, doc, submitter))
    # Prometheus, from one labelled namespace, scrapes Ray's and danmul's metrics ports, and nothing else
    def from_monitoring(p):
        return set(p.get("namespaceSelector", {}).get("matchLabels", {})) == {"kubernetes.io/metadata.name"}

    assert all(admitted(port, from_monitoring) for port in PROMETHEUS_PORTS)
    for rule in rules:
        for peer in rule.get("from", []):
            assert "ipBlock" not in peer, f"{name}: address-based peer {peer}"
            if "namespaceSelector" in peer and not is_operator(peer):
                assert {p["port"] for p in rule.get("ports", [])} <= PROMETHEUS_PORTS and rule.get("ports"), rule
        if not rule.get("from"):  # open to all: only the Serve HTTP API, only on the RayService
            assert doc["kind"] == "RayService" and {p["port"] for p in rule.get("ports", [])} == {8000}, rule


def image_tag(image: str) -> tuple[str, str]:
    """``registry:5000/a/b:tag@sha256:...`` -> (tag, digest); empty where absent."""
    name, _, digest = image.partition("@")
    return name.rsplit("/", 1)[-1].partition(":")[2], digest


@pytest.mark.parametrize("name", sorted(RAY_MANIFESTS))
def test_every_container_runs_unprivileged_from_a_versioned_image(name):
    doc = the(name, RAY_MANIFESTS[name])
    checked = 0
    for template in pod_templates(doc):
        pod_sc = template["spec"].get("securityContext", {})
        assert pod_sc.get("runAsUser") != 0, f"{name}: pod-level runAsUser 0 reaches containers KubeRay injects"
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            sc = {**pod_sc, **c.get("securityContext", {})}  # the container's settings override the pod's
            assert sc.get("runAsNonRoot") is True, f"{name}: {c['name']} may run as root"
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, f"{name}: {c['name']} runAsUser"
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, c["name"]
            tag, _ = image_tag(c["image"])
            assert tag and tag != "latest", f"{name}: {c['image']} needs a version tag (and a digest in production)"
            checked += 1
    assert checked >= len(ray_pod_templates(doc))
    cluster = cluster_of(doc)
    if cluster.get("enableInTreeAutoscaling"):  # the autoscaler sidecar KubeRay adds to the head
        sc = cluster.get("autoscalerOptions", {}).get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0
        assert sc.get("allowPrivilegeEscalation") is False
        if "image" in cluster["autoscalerOptions"]:
            assert image_tag(cluster["autoscalerOptions"]["image"])[0] not in ("", "latest")


def test_rayservice_expires_result_hashes():
    svc = the("rayservice.yaml", "RayService")
    [app] = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    ttl = app["args"]["result_ttl_s"]
    assert isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > 0
    assert ServeSettings(**app["args"]).result_ttl_s == ttl


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", "".join(line for line in f if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line]


def test_dockerfile_pins_its_base_runs_unprivileged_and_bakes_in_no_secrets():
    instructions = dockerfile()
    froms = [args.split() for op, args in instructions if op == "FROM"]
    assert froms
    for words in froms:
        image = next(w for w in words if not w.startswith("--"))
        tag, _ = image_tag(image)
        assert re.match(r"\d+\.\d+\.\d+(-|$)", tag), f"base image {image} needs an exact version tag"
    users = [args.strip() for op, args in instructions if op == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    last_user = max(i for i, (op, _) in enumerate(instructions) if op == "USER")
    assert all(op != "RUN" for op, _ in instructions[last_user:]), "RUN after the final USER"
    runs = " ".join(args for op, args in instructions if op == "RUN")
    if user.isdigit():  # the uid exists in the image, and the manifests run as the same uid
        assert re.search(rf"--uid {user}\b", runs)
        for name in RAY_MANIFESTS:
            for template in pod_templates(the(name, RAY_MANIFESTS[name])):
                assert template["spec"]["securityContext"]["runAsUser"] == int(user)
    env = " ".join(args for op, args in instructions if op in ("ENV", "ARG"))
    assert "PIP_NO_CACHE_DIR=1" in env
    assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL)", env, re.I), env
    assert not any(op == "COPY" and re.search(r"\.env|secret|\.aws|\.netrc", args, re.I) for op, args in instructions)
