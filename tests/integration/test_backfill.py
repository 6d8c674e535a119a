"""``danmul backfill`` for real: 2,000 images in a real S3 API (moto server mode), some corrupt, a local
Ray, a tiny model. Results must equal ``Tagger.predict`` image by image; an interrupted run, re-run,
must give every post exactly once; a manifest's tags must reach the model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pyarrow as pa
import pytest

from model.tagger import Tagger
from ray_jobs.backfill import BackfillConfig, read_results, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
N_GOOD, CORRUPT = 1980, {"truncated": 8, "not_an_image": 8, "empty": 4}
BACKFILL = [sys.executable, "-m", "ray_jobs.cli", "backfill", "--no-progress"]


@pytest.fixture(scope="module")
def archive(s3_endpoint, tiny_rows):
    """2,000 image files under s3://BUCKET/images/{0000..0003}/{post_id}.jpg, 20 of them corrupt."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = "danmul-archive"
    s3.create_bucket(Bucket=bucket)
    images: dict[int, bytes] = {}
    for i in range(N_GOOD):
        images[100_000 + i] = tiny_rows[i % len(tiny_rows)]["image"]
    bad: dict[int, str] = {}
    post = 200_000
    broken = {"truncated": tiny_rows[0]["image"][:200], "not_an_image": b"<html>gone</html>", "empty": b""}
    for reason, n in CORRUPT.items():
        for _ in range(n):
            images[post], bad[post] = broken[reason], reason
            post += 1
    for post_id, data in images.items():
        s3.put_object(Bucket=bucket, Key=f"images/{post_id % 4:04d}/{post_id}.jpg", Body=data)
    return f"s3://{bucket}/images", images, bad


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_archive_in_s3_matches_tagger_and_records_errors(local_ray, archive, tiny_checkpoint, s3_bucket):
    prefix, images, bad = archive
    out = f"{s3_bucket}/backfill"
    result = run(BackfillConfig(input=prefix, checkpoint=tiny_checkpoint, out=out, batch_size=64, progress=False),
                 log=lambda s: None)
    assert (result.processed, result.errors) == (N_GOOD, sum(CORRUPT.values()))
    results, errors = read_results(out)
    assert sorted(results.column("post_id").to_pylist()) == sorted(set(images) - set(bad))
    assert dict(zip(errors.column("post_id").to_pylist(), errors.column("reason").to_pylist(), strict=True)) == bad
    # every result is Tagger.predict's for the same image (no tags came with a bare prefix)
    tagger = Tagger.from_checkpoint(tiny_checkpoint)
    got = {r["post_id"]: r for r in results.to_pylist()}
    ids = sorted(got)
    for start in range(0, len(ids), 256):
        chunk = ids[start : start + 256]
        for post_id, want in zip(chunk, tagger.predict([images[p] for p in chunk]), strict=True):
            r = got[post_id]
            assert [c["name"] for c in r["characters"]] == [n for n, _ in want.characters]
            assert np.allclose([c["score"] for c in r["characters"]], [s for _, s in want.characters], atol=1e-5)
            assert {t["name"] for t in r["tags"]} == set(want.tags)
            assert r["model"] == tagger.version and r["abstained"] == want.abstained


def test_interrupted_then_rerun_gives_every_post_once(archive, tiny_checkpoint, tmp_path):
    prefix, images, bad = archive
    out = str(tmp_path / "out")
    args = [*BACKFILL, "--input", prefix, "--checkpoint", tiny_checkpoint, "--out", out, "--batch-size", "32"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (os.path.isdir(f"{out}/results") and len(os.listdir(f"{out}/results")) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-run
    proc.wait()
    partial, _ = read_results(out)
    assert 0 < partial.num_rows < N_GOOD
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming:" in done.stdout
    results, errors = read_results(out)
    ids = results.column("post_id").to_pylist() + errors.column("post_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(images)  # each post exactly once, none missing
    assert set(errors.column("post_id").to_pylist()) == set(bad)


def test_manifest_tags_reach_the_model(local_ray, tiny_rows, tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sample = tiny_rows[:80]
    for r in sample:
        (folder / f"{r['post_id']}.png").write_bytes(r["image"])
    manifest = tmp_path / "manifest.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "post_id": [r["post_id"] for r in sample],
        "image_uri": [str(folder / f"{r['post_id']}.png") for r in sample],
        "tags": [" ".join(r["tags"]) for r in sample],
    }), manifest)  # fmt: skip
    outs = {}
    for use_tags in (True, False):
        out = str(tmp_path / f"out-{use_tags}")
        run(BackfillConfig(input=str(manifest), checkpoint=tiny_checkpoint, out=out, use_tags=use_tags, progress=False),
            log=lambda s: None)
        outs[use_tags] = {r["post_id"]: r for r in read_results(out)[0].to_pylist()}
    tagger = Tagger.from_checkpoint(tiny_checkpoint)
    with_tags = tagger.predict([r["image"] for r in sample], tags=[r["tags"] for r in sample])
    image_only = tagger.predict([r["image"] for r in sample])
    differ = 0
    for r, w, i in zip(sample, with_tags, image_only, strict=True):
        got_t, got_i = outs[True][r["post_id"]], outs[False][r["post_id"]]
        assert [c["name"] for c in got_t["characters"]] == [n for n, _ in w.characters]
        assert {t["name"] for t in got_t["tags"]} == set(w.tags)
        assert {t["name"] for t in got_i["tags"]} == set(i.tags)
        differ += set(w.tags) != set(i.tags)
    assert differ > len(sample) // 2  # the tags changed what the model says, as Tagger says they should
