"""``danmul backfill`` for real: 2,000 images in a real S3 API (moto server mode), some corrupt, a local
Ray, a tiny model. Results must equal ``Tagger.predict`` image by image; an interrupted run, re-run,
must give every post exactly once; a manifest's tags must reach the model; images whose fetch failed for a
reason that may pass are left for the next run, not recorded as errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import numpy as np
import pyarrow as pa
import pytest
from local_cluster import own_ray, wait_until_gone

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
    with ThreadPoolExecutor(4) as pool:  # one at a time, each PUT waited on the server thread's turn
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=f"images/{item[0] % 4:04d}/{item[0]}.jpg",
                                                 Body=item[1]), images.items()))
    return f"s3://{bucket}/images", images, bad


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    """A Ray of 2 CPUs of its own: the backfill sizes its predictor pool from the cluster's CPUs. The S3 API
    is up first, so its workers inherit the environment that points at it (and its credentials)."""
    with own_ray(num_cpus=2):
        yield


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


def test_interrupted_then_rerun_gives_every_post_once(local_ray, archive, tiny_checkpoint, tmp_path, capsys):
    """The command as a user runs it, killed mid-run with everything it started, then the same job again.
    The killed driver joins the module's Ray (``--address``), as a driver on a cluster does: its workers and
    actors die with it, and the same command again (in this process, on the same cluster) takes what it left."""
    import ray

    prefix, images, bad = archive
    out = str(tmp_path / "out")
    args = [*BACKFILL, "--input", prefix, "--checkpoint", tiny_checkpoint, "--out", out, "--batch-size", "32",
            "--address", ray.get_runtime_context().gcs_address]
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # kill at the first result file: a whole run of these 2,000 images writes only about four, so waiting
        # for three let the run finish before the kill landed
        while not (os.path.isdir(f"{out}/results") and os.listdir(f"{out}/results")):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-run
        proc.wait()
    wait_until_gone(("Predictor", "BlockWriter", "decode_rows", "MapBatches"))  # its actors may still write
    partial, partial_errors = read_results(out)
    assert 0 < partial.num_rows < N_GOOD
    # the same command again, its parser and exit code in this process (a new interpreter adds only imports)
    from ray_jobs.cli import build_parser

    capsys.readouterr()
    again = build_parser().parse_args(args[3:])
    assert again.func(again) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"resuming: {partial.num_rows + partial_errors.num_rows:,} posts already in ")
    results, errors = read_results(out)
    ids = results.column("post_id").to_pylist() + errors.column("post_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(images)  # each post exactly once, none missing
    assert set(errors.column("post_id").to_pylist()) == set(bad)
    tagged, failed = N_GOOD - partial.num_rows, len(bad) - partial_errors.num_rows
    done = partial.num_rows + partial_errors.num_rows
    assert f"{tagged:,} images tagged, {failed:,} errors, {done:,} skipped" in "\n".join(lines)


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
        out, lines = str(tmp_path / f"out-{use_tags}"), []
        run(BackfillConfig(input=str(manifest), checkpoint=tiny_checkpoint, out=out, use_tags=use_tags, progress=False,
                           batch_size=128, actors=2), log=lines.append)  # fmt: skip
        outs[use_tags] = {r["post_id"]: r for r in read_results(out)[0].to_pylist()}
        # 80 images are one batch: one predictor loads the model, not the 2 asked for
        assert "with 1 predictor(s) on CPU, batch 128" in lines[0], lines
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


def test_fetch_failures_that_may_pass_are_retried_by_the_next_run(local_ray, s3_endpoint, tiny_rows, tiny_checkpoint,
                                                                   tmp_path):
    """A manifest whose images are partly local, partly in S3 behind an endpoint that is down during the
    first run (its port refuses connections). The first run tags the local ones, records the permanent
    failures, and records nothing for the S3 ones; the same command once the store is up tags them, and
    an S3 key that does not exist, untestable while the store was down, becomes an error then."""
    import pyarrow.parquet as pq
    from moto.server import ThreadedMotoServer

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"danmul-late-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    folder = tmp_path / "imgs"
    folder.mkdir()
    uris: dict[int, str] = {}
    local_ok, s3_ok, bad = [], [], {}
    for i, r in enumerate(tiny_rows[:42]):
        post_id = 500_000 + i
        if i < 30:
            (folder / f"{post_id}.png").write_bytes(r["image"])
            uris[post_id] = str(folder / f"{post_id}.png")
            local_ok.append(post_id)
        else:
            s3.put_object(Bucket=bucket, Key=f"late/{post_id}.png", Body=r["image"])
            uris[post_id] = f"s3://{bucket}/late/{post_id}.png"
            s3_ok.append(post_id)
    for post_id, (reason, data) in enumerate([("not_an_image", b"<html>gone</html>"), ("empty", b"")] * 2, 600_000):
        (folder / f"{post_id}.png").write_bytes(data)
        uris[post_id], bad[post_id] = str(folder / f"{post_id}.png"), reason
    for post_id in (600_010, 600_011):
        uris[post_id], bad[post_id] = str(folder / f"{post_id}.png"), "not_found"  # no such local file
    s3_missing = {600_020: "not_found", 600_021: "not_found"}
    for post_id in s3_missing:
        uris[post_id] = f"s3://{bucket}/late/{post_id}.png"  # no such key: only known once the store answers
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"post_id": list(uris), "image_uri": list(uris.values())}), manifest)

    # The endpoint's port is held, bound but not listening (connections are refused, and no other process
    # can take it), then served by a second moto server: same process, so the same buckets as s3_endpoint's.
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    port = hold.getsockname()[1]
    out = str(tmp_path / "out")
    cfg = BackfillConfig(input=str(manifest), checkpoint=tiny_checkpoint, out=out, endpoint_url=f"http://127.0.0.1:{port}",
                         batch_size=16, progress=False)  # fmt: skip
    try:
        first_log: list[str] = []
        first = run(cfg, log=first_log.append)
    finally:
        hold.close()
    results, errors = read_results(out)
    assert sorted(results.column("post_id").to_pylist()) == sorted(local_ok)
    # the permanent failures only: nothing of the store that was down
    assert dict(zip(errors.column("post_id").to_pylist(), errors.column("reason").to_pylist(), strict=True)) == bad
    assert (first.processed, first.errors, first.retry) == (len(local_ok), len(bad), len(s3_ok) + len(s3_missing))
    assert first_log[-1] == (f"{len(s3_ok) + len(s3_missing)} images failed for reasons that may pass: "
                             "run the same command again to retry them")

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        second_log: list[str] = []
        second = run(cfg, log=second_log.append)
    finally:
        server.stop()
    assert (second.processed, second.errors, second.retry) == (len(s3_ok), len(s3_missing), 0)
    assert second.skipped == len(local_ok) + len(bad)
    assert not any("may pass" in line for line in second_log)
    results, errors = read_results(out)
    ids = results.column("post_id").to_pylist() + errors.column("post_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(uris)  # every post exactly once across results and errors
    assert sorted(results.column("post_id").to_pylist()) == sorted(local_ok + s3_ok)
    assert dict(zip(errors.column("post_id").to_pylist(), errors.column("reason").to_pylist(),
                    strict=True)) == bad | s3_missing  # fmt: skip


def test_a_store_that_does_not_answer_is_tried_once_per_batch(s3_endpoint, tiny_rows, tiny_checkpoint, tmp_path):
    """Each S3 read of a store that refuses connections waits out the client's retries (about a second): the
    decode step tries the store once per batch and leaves the batch's other S3 images for the next run
    (retry, not errors), while local images in the same batch are still read."""
    from ray_jobs.backfill import decode_rows

    hold = socket.socket()  # bound, not listening: connections are refused
    hold.bind(("127.0.0.1", 0))
    try:
        local = tmp_path / "1.png"
        local.write_bytes(tiny_rows[0]["image"])
        uris = [f"s3://danmul-down/{i}.png" for i in range(4)] + [str(local)]
        batch = {"post_id": np.arange(1, 6), "image": np.array([None] * 5, dtype=object),
                 "image_uri": np.array(uris, dtype=object), "tags": np.array([None] * 5, dtype=object)}
        out = decode_rows(batch, tiny_checkpoint, f"http://127.0.0.1:{hold.getsockname()[1]}")
    finally:
        hold.close()
    assert out["retry"].tolist() == [True] * 4 + [False] and out["reason"][4] == ""
    assert "NETWORK_CONNECTION" in out["detail"][0]
    assert all("not tried, s3://danmul-down did not answer earlier in this batch" in d for d in out["detail"][1:4])


def test_the_decode_step_refuses_what_the_streaming_tagger_refuses(tiny_rows, tiny_checkpoint):
    """The backfill decodes in the same decode pool, with the same structure, pixel and CPU budgets: the
    issue's CPU bombs and costly structures become error rows (fast), the good image beside them decodes."""
    from hostile_images import corpus

    from model.checkpoint import read_config
    from model.preprocess import Preprocessor
    from ray_jobs.backfill import decode_rows

    names = ["progressive_4000x4000_10000_scans.jpg", "jpeg_2M_empty_app_markers.jpg", "png_2.5M_empty_chunks.png",
             "gif_16M_one_byte_blocks.gif", "postscript_8MB.eps", "bomb_1bit_9000x6000.png"]  # fmt: skip
    images = [corpus()[n][0] for n in names] + [tiny_rows[0]["image"]]
    n = len(images)
    batch = {"post_id": np.arange(1, n + 1), "image": np.array(images, dtype=object),
             "image_uri": np.array([None] * n, dtype=object), "tags": np.array([None] * n, dtype=object)}
    out = decode_rows(batch, tiny_checkpoint, None)
    assert list(out["reason"]) == [corpus()[name][1] for name in names] + [""]
    assert not out["retry"].any()
    pre = Preprocessor.from_config(read_config(tiny_checkpoint))
    assert np.array_equal(out["pixels"][-1], pre.array(images[-1]))


def test_gpu_decoding_rows_refuse_and_predict_as_the_cpu_paths_do(tiny_rows, tiny_checkpoint):
    """--gpu-decode, without Ray: the decode step checks headers (the same refusals), hands JPEGs on as bytes with
    their plan and everything else as 8-bit squares; the predictor decodes the bytes on its device (here the CPU,
    with torchvision's libjpeg) and predicts what it predicts from the CPU path's pixels, within the tolerance."""
    from hostile_images import corpus

    from model.gpu_decode import PLAN_FIELDS
    from ray_jobs.backfill import Predictor, decode_rows

    items = corpus()
    names = [n for n in items if len(items[n][0]) < 1 << 20]  # the quick ones: each reason, every format
    images = [items[n][0] for n in names] + [r["image"] for r in tiny_rows[:200]]
    n = len(images)
    batch = {"post_id": np.arange(1, n + 1), "image": np.array(images, dtype=object),
             "image_uri": np.array([None] * n, dtype=object), "tags": np.array([None] * n, dtype=object)}
    cpu = decode_rows(batch, tiny_checkpoint, None)
    dev = decode_rows(batch, tiny_checkpoint, None, device_decode=True)
    assert list(dev["reason"]) == list(cpu["reason"]) and "pixels" not in dev
    assert dev["plan"].shape == (n, PLAN_FIELDS) and dev["plan"].any(axis=1).sum() > 100  # the JPEGs, as bytes
    predictor = Predictor(tiny_checkpoint, None, top_k=3, batch_size=32)
    want, got = predictor(cpu).to_pylist(), predictor(dev).to_pylist()
    assert [r["reason"] for r in got] == [r["reason"] for r in want]
    top1 = [(a["characters"][0]["name"], b["characters"][0]["name"]) for a, b in zip(want, got, strict=True)
            if a["reason"] == ""]
    assert sum(a == b for a, b in top1) >= 0.97 * len(top1)
    for a, b in zip(want, got, strict=True):
        if a["reason"] == "":
            assert abs(a["characters"][0]["score"] - b["characters"][0]["score"]) < 0.02


def test_archive_with_gpu_decoding_on_matches_tagger(local_ray, archive, tiny_checkpoint, s3_bucket):
    """The whole job with --gpu-decode on and CPU predictors: the same rows and errors as the CPU path, the
    same top character nearly always (the two paths agree within model.gpu_decode's tolerance)."""
    prefix, images, bad = archive
    out = f"{s3_bucket}/backfill-gpu-decode"
    lines = []
    result = run(BackfillConfig(input=prefix, checkpoint=tiny_checkpoint, out=out, gpu_decode="on", progress=False),
                 log=lines.append)
    assert "JPEGs decoded by the predictors" in lines[0] and "batch 64" in lines[0]
    assert (result.processed, result.errors) == (N_GOOD, sum(CORRUPT.values()))
    results, errors = read_results(out)
    assert dict(zip(errors.column("post_id").to_pylist(), errors.column("reason").to_pylist(), strict=True)) == bad
    tagger = Tagger.from_checkpoint(tiny_checkpoint)
    got = {r["post_id"]: r["characters"][0]["name"] for r in results.to_pylist()}
    ids = sorted(got)
    want = {p: pred.characters[0][0] for p, pred in zip(ids, tagger.predict([images[p] for p in ids]), strict=True)}
    assert sum(got[p] == want[p] for p in ids) >= 0.97 * len(ids)
