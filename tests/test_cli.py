"""The ``danmul`` command line, run as a user runs it (a subprocess), end to end."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from ingest.shards import load_info
from ingest.storage import Storage
from tests.unit.test_build import make_danbooru

pytestmark = pytest.mark.e2e
DANMUL = [sys.executable, "-m", "ray_jobs.cli"]


def danmul(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*DANMUL, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"danmul {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_every_command_with_defaults():
    out = danmul("--help").stdout
    for command in ("data", "bench", "demo"):
        assert command in out
    for sub in (["data", "build"], ["data", "synth"], ["data", "stats"], ["bench", "build"], ["demo"]):
        assert danmul(*sub, "--help").stdout.startswith("usage: danmul")
    build_help = " ".join(danmul("data", "build", "--help").stdout.split())  # as read, whatever the wrapping
    assert "--min-images MIN_IMAGES drop characters with fewer posts than this (default: 10)" in build_help
    assert "--min-tag-count" in build_help and "(default: 5)" in build_help


def test_synth_then_stats(tmp_path):
    out = str(tmp_path / "synth")
    proc = danmul("data", "synth", "--out", out, "--characters", "8", "--images", "120",
                  "--image-size", "48", "--seed", "2")
    assert "| dataset |" in proc.stdout.replace("  ", " ") or "dataset" in proc.stdout
    info = load_info(Storage(out))
    assert (info.num_images, info.num_characters, info.config["seed"]) == (120, 8, 2)
    stats = danmul("data", "stats", out).stdout
    assert "120" in stats and "tag vocabulary" in stats and "Gini" in stats


def test_build_with_yaml_config_and_flag_override(tmp_path):
    root = Storage(str(tmp_path / "danbooru"))
    make_danbooru(root)
    config = tmp_path / "build.yaml"
    config.write_text(f"metadata: {root.uri_of('meta')}\nimages: {root.uri_of('512px')}\n"
                      f"out: {tmp_path / 'out'}\nmin_images: 100\nmin_tag_count: 3\n")
    proc = danmul("data", "build", "--config", str(config), "--min-images", "10")  # flag beats file
    assert "metadata lines" in proc.stdout and "malformed_json 1" in proc.stdout
    info = load_info(Storage(str(tmp_path / "out")))
    assert info.num_images == 21 and info.config["min_images"] == 10
    # the settings that built it are recorded with it
    assert json.loads(Storage(str(tmp_path / "out")).read_text("dataset.json"))["config"]["min_tag_count"] == 3


def test_errors_are_one_clear_line_and_nonzero(tmp_path):
    proc = danmul("data", "stats", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2
    assert "not a Dan:mul dataset" in proc.stderr and "Traceback" not in proc.stderr
    proc = danmul("data", "build", "--images", "x", "--out", "y", check=False)
    assert proc.returncode == 2 and "--metadata" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_setting: 1\n")
    proc = danmul("data", "synth", "--config", str(bad), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "no_such_setting" in proc.stderr


def processes_of(run: str) -> list[str]:
    """Live processes started by the command run with ``DANMUL_TEST_RUN=run`` (they inherit its environment:
    Ray's gcs_server, raylet and workers, the demo's redis-server); other tests' processes are not counted."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "name"]):
        with contextlib.suppress(psutil.Error):
            if p.environ().get("DANMUL_TEST_RUN") == run:
                found.append(f"{p.info['pid']} {p.info['name']}")
    return found


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_leaves_no_processes(tmp_path):
    run = f"demo-{os.getpid()}-{time.monotonic_ns()}"
    proc = danmul("demo", "--quick", "--out", str(tmp_path / "demo"), env={"DANMUL_TEST_RUN": run})
    out = proc.stdout
    for step in ("== step 1", "== step 2", "== step 3", "== step 4", "== step 5: shut down", "demo finished"):
        assert step in out, out[-3000:]
    assert "| image only |" in out and "| image + tags |" in out  # the evaluation table
    # the streaming step: every good upload tagged, each broken one dead-lettered with its reason
    m = re.search(r"tagged (\d+) of (\d+) good uploads; (\d+) dead letters of 5 broken", out)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0 and m.group(3) == "5", out[-3000:]
    for reason in ("truncated", "not_an_image", "missing_post_id", "bad_tags", "forbidden_path"):
        assert f"reason={reason}" in out
    assert "streamed, with tags" in out and "of the answers right (precision)" in out and "p99" in out
    # the backfill step: the whole test split tagged, the one broken file recorded as an error
    m = re.search(r"backfill: (\d+) tagged, 1 error\(s\) \(not_an_image\)", out)
    assert m and int(m.group(1)) > 0, out[-3000:]
    assert list((tmp_path / "demo" / "backfill" / "results").glob("part-*.parquet"))
    assert load_info(Storage(str(tmp_path / "demo" / "data"))).num_images > 0
    # a quiet console: no line of Ray's C++ core ("[2026-.. E 123 123] core_worker.cc:..") or its loggers
    noise = [line for line in (out + proc.stderr).splitlines()
             if re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+ [IWEF] \d+ \d+\]", line) or ".cc:" in line
             or re.match(r"\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING)", line)]
    assert not noise, noise[:5]
    assert (tmp_path / "demo" / "runs" / "demo" / "model" / "model.safetensors").exists()
    deadline = time.monotonic() + 30  # Ray's daemons exit a moment after the driver
    while processes_of(run) and time.monotonic() < deadline:
        time.sleep(1)
    assert not processes_of(run)


@pytest.mark.bench
def test_bench_build_smoke():
    """The benchmark runs and prints its table (figures only; nothing about speed is asserted)."""
    proc = danmul("bench", "build", "--lines", "2000", "--lines", "4000")
    assert "| metadata lines |" in proc.stdout and "peak memory" in proc.stdout


def test_bench_gpu_quick_runs_every_part_as_json_lines():
    """``python -m ray_jobs.bench_gpu --quick`` as the GPU machine runs it (module form, no install): every line
    on stdout is JSON, every part gives its figures, and a machine without a GPU says so and exits 0."""
    import torch

    proc = subprocess.run([sys.executable, "-m", "ray_jobs.bench_gpu", "--quick", "--no-ray"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(s) for s in proc.stdout.splitlines()]
    figures = {line["figure"]: line for line in lines}
    assert not [line for line in lines if "error" in line], proc.stderr[-3000:]
    for name in ("bare_inference_eager", "bare_inference_channels_last", "decode_cpu_pil", "header_checks",
                 "gpu_decode_agreement", "backfill_predictor_gpu_decode", "backfill_predictor_cpu_decoded",
                 "replica_batch", "train_step_bare", "train_step_shared"):
        assert figures[name]["value"] > 0 and {"gpu", "torch", "cuda"} <= set(figures[name]), name
    assert figures["replica_batch"]["ratio_to"] == "bare_inference_b8" and figures["replica_batch"]["ratio"] > 0
    assert figures["gpu_decode_agreement"]["within_tolerance"] is True
    assert figures["ray"]["skipped"] == "--no-ray"
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in figures["gpu"]["skipped"] and figures["environment"]["device"] == "cpu"
        assert "skipped" in figures["bare_inference_compiled"]
    assert danmul("bench", "gpu", "--help").stdout.startswith("usage: danmul bench gpu")
