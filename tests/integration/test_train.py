"""``danmul train`` for real: a local Ray cluster, 2 CPU workers with DDP, Ray Data reading shards from
a real S3 API (moto server); fault tolerance, resume after an interrupted driver, and corrupt images in
the shards. The CLI runs as a user runs it, in a subprocess (``tests/fault_train.py`` kills a worker)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from local_cluster import wait_until_gone
from PIL import Image

from ingest.schema import SHARD_SCHEMA
from ingest.shards import load_info
from ingest.storage import Storage
from ingest.synth import SynthConfig, synthesize
from model.defaults import CURRICULUM_MAX_DROP
from model.tagger import Tagger
from ray_jobs.local_redis import free_port
from ray_jobs.train import read_progress
from ray_jobs.train_data import decode_batch

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TRAIN = [sys.executable, "-m", "ray_jobs.cli", "train", "--image-size", "32", "--batch-size", "32"]


def small_dataset(uri: str) -> None:
    synthesize(SynthConfig(out=uri, characters=8, images=480, image_size=32, seed=1, workers=1), progress=False)


def add_corrupt_shard(data: Storage) -> int:
    """An extra train shard whose images are broken; returns how many rows it holds."""
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(good, format="JPEG")
    info = load_info(data)
    # four rows: 384 good + 4 split evenly over 2 workers (an equal split drops a remainder row)
    rows = [good.getvalue()[:60], b"not an image at all", b"", b"\x89PNG\r\n\x1a\n truncated"]
    n = len(rows)
    table = pa.table({
        "post_id": [900001 + i for i in range(n)], "image": rows, "character": [info.characters[0]] * n,
        "tags": [["solo"]] * n, "copyright": [[]] * n, "rating": ["g"] * n,
    }, schema=SHARD_SCHEMA)  # fmt: skip
    data.write_parquet("train/part-99999.parquet", table)
    return len(rows)


def run_train(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TRAIN, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_decode_batch_flags_bad_rows_without_dropping_them():
    good = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(good, format="PNG")
    batch = {"image": np.array([good.getvalue(), b"junk"], dtype=object),
             "character": np.array(["a", "b"], dtype=object),
             "tags": np.array([np.array(["t1"]), np.array(["t2", "zz"])], dtype=object)}
    out = decode_batch(batch, ["a", "b"], ["t1", "t2"], 16, [0.5] * 3, [0.5] * 3, 4, augment=False)
    assert out["ok"].tolist() == [True, False]
    assert out["images"].shape == (2, 3, 16, 16) and out["characters"].tolist() == [0, 1]
    assert out["tag_targets"].tolist() == [[1, 0], [0, 1]]


def scrape(port: int) -> dict[str, float]:
    """The danmul_train_* values the rank-0 worker serves; {} while nothing answers."""
    with contextlib.suppress(OSError, http.client.HTTPException):  # refused, or cut off by a worker restart
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in scraped.splitlines()
                if line.startswith("danmul_train_")}
    return {}


def interrupt_after_restart(first: subprocess.Popen, run: Storage, port: int) -> tuple[float, dict, bool]:
    """Ctrl-C on the first run once its restarted worker group has finished an epoch (a second start of
    epoch 2 with an end after it, and Ray's record of a checkpoint) and its gauges answered. Returns when
    it was sent, the last gauges scraped, and whether the restart was seen."""
    deadline, values, restarted = time.monotonic() + 600, {}, False
    while not (restarted and values.get("danmul_train_epoch", 0) >= 1) and first.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        values = scrape(port) or values
        events = read_progress(run)
        again = [i for i, e in enumerate(events) if e["event"] == "start" and e["epoch"] == 2][1:]
        restarted = bool(again) and any(e["event"] == "end" for e in events[again[0]:]) \
            and run.exists("checkpoint_manager_snapshot.json")
    interrupted = time.monotonic()
    first.send_signal(signal.SIGINT)  # Ctrl-C, to the driver alone (its own session)
    first.wait(timeout=120)
    return interrupted, values, restarted


def test_from_s3_a_killed_worker_an_interrupted_driver_and_corrupt_images_then_resume_and_export(ray_cluster, s3_bucket,
                                                                                               tmp_path, capsys):
    """One run meets what a production run meets: shards in object storage with corrupt images in them,
    a worker process that dies mid-run (Ray restarts the group from the last checkpoint), then Ctrl-C on
    the driver; the same command again resumes, finishes and exports the model that danmul eval
    reproduces. (Each training run costs half a minute of start-up on 2 cores: one run checks it all.) Both
    runs join the tests' Ray as drivers (``--address``, as on a cluster): what the interrupted driver started
    dies with it, and a cluster's start is not what is under test."""
    import ray

    data = Storage(f"{s3_bucket}/danmul")
    small_dataset(data.uri)
    declared = load_info(data).splits["train"]
    n_bad = add_corrupt_shard(data)
    runs = Storage(f"{s3_bucket}/runs")
    run = runs.child("s3run")
    epochs = 6  # killed in epoch 2, interrupted once epoch 2 is done again: several epochs are left to resume
    args = ["--data", data.uri, "--out", runs.uri, "--name", "s3run", "--epochs", str(epochs), "--workers", "2",
            "--address", ray.get_runtime_context().gcs_address]
    marker, port = tmp_path / "killed", free_port()  # the first run also serves danmul_train_* (rank-0 worker)
    started = time.monotonic()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "tests.fault_train", "--kill-rank", "1", "--kill-epoch", "1",
                                  "--marker", str(marker), "--", *TRAIN[4:], *args, "--metrics-port", str(port)],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            interrupted, values, restarted = interrupt_after_restart(first, run, port)
        finally:
            if first.poll() is None:  # the test failed on the way: the run and what it started go too
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
    print(f"first run: {interrupted - started:.0f} s to the interrupt, {time.monotonic() - interrupted:.0f} s to exit")
    out_first = (tmp_path / "first.log").read_text()
    assert restarted, out_first[-3000:]
    # the plan counts the rows the shards hold, not what dataset.json declares
    assert f"its shards hold {declared + n_bad:,} rows" in out_first
    assert f"plan: {declared + n_bad:,} images" in out_first
    # the rank-0 worker served its gauges
    assert values["danmul_train_epoch"] >= 1 and values["danmul_train_step"] > 0 and values["danmul_train_loss"] > 0
    assert 0 <= values['danmul_train_val_top1{mode="image_only"}'] <= 1
    assert values["danmul_train_samples_per_second"] > 0
    # the killed worker: the group restarted from the checkpoint of epoch 1, which was not trained again
    assert marker.read_text().startswith("killed rank 1 at epoch 1")
    events = read_progress(run)
    ends = [e for e in events if e["event"] == "end"]
    starts = [e["epoch"] for e in events if e["event"] == "start"]
    # one restart, no other: epochs 1, 2, then 2 again and on in order, each ended except perhaps the last
    assert [e["epoch"] for e in ends] == list(range(1, len(ends) + 1)) and len(ends) >= 2
    assert starts[:3] == [1, 2, 2] and starts[2:] == list(range(2, len(starts))), starts
    assert len(starts) - 1 - len(ends) in (0, 1), (starts, ends)
    restarted_at = [e for e in events if e["event"] == "start" and e["epoch"] == 2][1]
    assert restarted_at["global_step"] == ends[0]["global_step"]
    done_before = [e["epoch"] for e in ends]
    print(f"interrupted after epochs {done_before} of {epochs}")
    assert done_before[-1] < epochs, "the first run was not interrupted"

    # the same command again: resumes where the interrupted run's last checkpoint left off (once what the
    # interrupted driver started is gone: until then its workers hold the CPUs and may still write)
    wait_until_gone(("RayTrainWorker", "TrainController", "SplitCoordinator", "DatasetManager"))
    started = time.monotonic()
    proc = run_train(*args)
    print(f"second run: {time.monotonic() - started:.0f} s")
    assert "resuming after epoch" in proc.stdout + proc.stderr
    assert "exported to" in proc.stdout
    ends = [e for e in read_progress(run) if e["event"] == "end"]
    assert sorted({e["epoch"] for e in ends}) == list(range(1, epochs + 1))
    assert [e["epoch"] for e in ends].count(1) == 1  # epochs finished before the interrupt were not trained again
    assert [e["bad_images"] for e in ends] == [n_bad] * len(ends)  # every epoch meets them, skips them, counts them
    assert ends[-1]["text_drop"] == pytest.approx(CURRICULUM_MAX_DROP)  # the curriculum reached its maximum

    model = run.child("model")
    tagger = Tagger.from_checkpoint(model)
    metrics = json.loads(model.read_text("metrics.json"))
    info = load_info(data)
    test_labels = Counter()
    from ingest.shards import iter_examples

    rows = list(iter_examples(data, "test"))
    test_labels.update(r["character"] for r in rows)
    majority = max(test_labels.values()) / len(rows)
    print(f"majority {majority:.2f}; test {metrics['test']}")
    assert metrics["test"]["image_only"]["images"] == len(rows)
    assert metrics["test"]["image_only"]["top1"] > max(majority, 3 / info.num_characters)
    assert metrics["test"]["image_only"]["top5"] >= 0.8
    preds = tagger.predict([r["image"] for r in rows])
    acc = np.mean([p.best_character[0] == r["character"] for p, r in zip(preds, rows, strict=True)])
    assert acc == pytest.approx(metrics["test"]["image_only"]["top1"])
    assert len(json.loads(model.read_text("labels.json"))["character_thresholds"]) == info.num_characters

    # danmul eval on the exported model reproduces the test metrics the run wrote (its parser and command, in
    # this process: it starts no Ray, and a new interpreter would only add its imports)
    from ray_jobs.cli import build_parser

    capsys.readouterr()
    args = build_parser().parse_args(["eval", "--checkpoint", model.uri, "--data", data.uri])
    assert args.func(args) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| image only |"))
    assert row.split("|")[2].strip() == f"{metrics['test']['image_only']['top1']:.3f}"
