"""``danmul train`` for real: a local Ray cluster, 2 CPU workers with DDP, Ray Data reading shards from
a real S3 API (moto server) or a folder; fault tolerance, resume after an interrupted driver, and
corrupt images in the shards. Each test runs the CLI as a user does, in a subprocess."""

from __future__ import annotations

import contextlib
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
from PIL import Image

from ingest.schema import SHARD_SCHEMA
from ingest.shards import load_info
from ingest.storage import Storage
from ingest.synth import SynthConfig, synthesize
from model.tagger import Tagger
from ray_jobs.local_redis import free_port
from ray_jobs.train import decode_batch, read_progress

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


def test_two_workers_from_s3_survive_a_killed_worker_skip_corrupt_images_and_export(s3_bucket, tmp_path):
    """One run checks what a production run meets at once: shards in object storage, corrupt images in
    them, a worker process that dies mid-run (Ray restarts the group from the last checkpoint), and the
    export that danmul eval reproduces."""
    data = Storage(f"{s3_bucket}/danmul")
    small_dataset(data.uri)
    declared = load_info(data).splits["train"]
    n_bad = add_corrupt_shard(data)
    runs = Storage(f"{s3_bucket}/runs")
    marker = tmp_path / "killed"
    proc = run_train("--data", data.uri, "--out", runs.uri, "--name", "s3run", "--epochs", "4", "--workers", "2",
                     env={"DANMUL_TEST_FAULT": f"1:1:{marker}"})
    assert "exported to" in proc.stdout
    # the plan counts the rows the shards hold, not what dataset.json declares
    assert f"its shards hold {declared + n_bad:,} rows" in proc.stdout
    assert f"plan: {declared + n_bad:,} images" in proc.stdout

    # the killed worker: the group restarted from the checkpoint of epoch 1, which was not trained again
    assert marker.read_text().startswith("killed rank 1 at epoch 1")
    events = read_progress(runs.child("s3run"))
    ends = [e for e in events if e["event"] == "end"]
    assert [e["epoch"] for e in ends] == [1, 2, 3, 4]
    assert [e["epoch"] for e in events if e["event"] == "start"] == [1, 2, 2, 3, 4]
    restarted = [e for e in events if e["event"] == "start" and e["epoch"] == 2][1]
    assert restarted["global_step"] == ends[0]["global_step"]
    assert [e["bad_images"] for e in ends] == [n_bad] * 4  # every epoch meets them, skips them, counts them
    assert ends[-1]["text_drop"] == pytest.approx(0.75)  # the curriculum reached its maximum

    model = runs.child("s3run/model")
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

    # danmul eval on the exported model reproduces the test metrics the run wrote
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "eval", "--checkpoint", model.uri, "--data", data.uri],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| image only |"))
    assert row.split("|")[2].strip() == f"{metrics['test']['image_only']['top1']:.3f}"


def test_rerunning_an_interrupted_run_resumes(tmp_path):
    data = str(tmp_path / "data")
    small_dataset(data)
    runs = tmp_path / "runs"
    epochs = 6  # the interrupt lands after epoch 1 or 2 (the run stops within an epoch of Ctrl-C): mid-run
    args = ["--data", data, "--out", str(runs), "--name", "resume", "--epochs", str(epochs)]
    port = free_port()  # the first run also serves its danmul_train_* metrics (rank-0 worker)
    first = subprocess.Popen([*TRAIN, *args, "--metrics-port", str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    snapshot = runs / "resume" / "checkpoint_manager_snapshot.json"  # Ray has recorded a checkpoint
    deadline = time.monotonic() + 600
    values = {}
    # any finished epoch will do: the first successful scrape may already show epoch 2 or later
    while not (snapshot.exists() and values.get("danmul_train_epoch", 0) >= 1) and first.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        with contextlib.suppress(OSError):
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in scraped.splitlines()
                      if line.startswith("danmul_train_")}
    assert snapshot.exists(), "no checkpoint was recorded"
    assert values["danmul_train_epoch"] >= 1 and values["danmul_train_step"] > 0 and values["danmul_train_loss"] > 0
    assert 0 <= values['danmul_train_val_top1{mode="image_only"}'] <= 1
    assert values["danmul_train_samples_per_second"] > 0
    first.send_signal(signal.SIGINT)  # Ctrl-C
    first.wait(timeout=120)
    done_before = [e["epoch"] for e in read_progress(Storage(str(runs / "resume"))) if e["event"] == "end"]
    print(f"interrupted after epochs {done_before} of {epochs}")
    assert done_before and done_before[-1] < epochs, "the first run was not interrupted"

    proc = run_train(*args)
    assert "resuming after epoch" in proc.stdout + proc.stderr
    ends = [e["epoch"] for e in read_progress(Storage(str(runs / "resume"))) if e["event"] == "end"]
    assert sorted(set(ends)) == list(range(1, epochs + 1))
    assert ends.count(1) == 1  # the epochs finished before the interrupt were not trained again
    assert (runs / "resume" / "model" / "model.safetensors").exists()
