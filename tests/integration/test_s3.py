"""Object storage and the dataset builders against a real S3 API (moto in server mode on a local
port, started by the tests). Nothing is mocked: pyarrow's S3 client and boto3 talk HTTP to it."""

from __future__ import annotations

import gzip

import boto3
import pytest

from ingest.build import BuildConfig, build
from ingest.schema import SPLITS
from ingest.shards import iter_examples, load_info
from ingest.storage import NotFound, Storage
from ingest.synth import SynthConfig, synthesize
from tests.unit.test_build import make_danbooru

pytestmark = pytest.mark.integration


def test_storage_roundtrip_on_s3(s3_bucket, s3_endpoint):
    s = Storage(f"{s3_bucket}/prefix")
    s.write_bytes("a/one.bin", b"1")
    s.write_text("two.txt", "two")
    s.write_bytes("logs.json.gz", gzip.compress(b'{"x": 1}\n{"y": 2}\n'))
    assert s.read_bytes("a/one.bin") == b"1"
    assert s.exists("a/one.bin") and s.is_file("two.txt") and not s.exists("nope")
    assert [e.path for e in s.list()] == ["a/one.bin", "logs.json.gz", "two.txt"]
    assert [e.path for e in s.list("a", recursive=False)] == ["one.bin"]
    assert list(s.open_lines("logs.json.gz")) == [b'{"x": 1}', b'{"y": 2}']
    with pytest.raises(NotFound):
        s.read_bytes("nope")
    # what we wrote is really in the bucket, seen by an independent client
    bucket = s3_bucket.removeprefix("s3://")
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=bucket, Key="prefix/two.txt")["Body"]
    assert body.read() == b"two"
    s.delete_prefix("a")
    assert not s.exists("a/one.bin")


def test_explicit_endpoint_wins_over_environment(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    s = Storage(s3_bucket, endpoint_url=s3_endpoint)
    s.write_bytes("x", b"ok")
    assert s.read_bytes("x") == b"ok"


def test_build_from_s3_into_s3_matches_a_local_build(s3_bucket, tmp_path):
    """Metadata and images in a bucket, dataset written to a bucket: same dataset as from a folder."""
    remote = Storage(f"{s3_bucket}/danbooru")
    local = Storage(str(tmp_path / "danbooru"))
    make_danbooru(remote)
    make_danbooru(local)

    def run(root: Storage, out: str):
        cfg = BuildConfig(metadata=root.uri_of("meta"), images=root.uri_of("512px"), out=out,
                          min_images=10, min_tag_count=3, io_threads=4)
        return build(cfg, progress=False, log=lambda s: None).info

    info_s3 = run(remote, f"{s3_bucket}/danmul")
    info_local = run(local, str(tmp_path / "danmul"))
    assert info_s3.num_images == info_local.num_images == 21
    assert info_s3.tags == info_local.tags and info_s3.characters == info_local.characters
    assert [f.removed_posts for f in info_s3.filters] == [f.removed_posts for f in info_local.filters]
    out_s3 = Storage(f"{s3_bucket}/danmul")
    assert load_info(out_s3).num_images == 21

    def rows(storage):
        return sorted((s, r["post_id"], r["image"], tuple(r["tags"])) for s in SPLITS
                      for r in iter_examples(storage, s))

    assert rows(out_s3) == rows(Storage(str(tmp_path / "danmul")))


def test_synth_into_s3_is_read_by_ray_data(s3_bucket, ray_cluster):
    """The shard contract as the training job will use it: Ray Data reads a split straight from S3."""
    import ray

    out = Storage(f"{s3_bucket}/synth")
    info = synthesize(SynthConfig(out=out.uri, characters=6, images=90, image_size=48, workers=1),
                      progress=False)
    assert sorted(e.path for e in out.list(suffixes=(".parquet",))) == sorted(
        p for s in SPLITS for p in info.shards[s])
    ds = ray.data.read_parquet(out.path("train"), filesystem=out.fs).select_columns(["post_id", "character"])
    rows = ds.take_all()
    assert len(rows) == info.splits["train"]
    assert {r["character"] for r in rows} == set(info.characters)


def test_checkpoint_in_s3_tags_images_in_s3_through_the_cli(s3_bucket, tmp_path):
    """``danmul tag`` with the checkpoint and an image in object storage, and a broken local file:
    one JSON line each, the broken one an error, exit status 1."""
    import io
    import json
    import subprocess
    import sys

    import torch
    from PIL import Image

    from model.checkpoint import Labels, save
    from model.config import preset
    from model.network import DanmulNet

    torch.manual_seed(0)
    net = DanmulNet(preset("tiny", num_characters=3, num_tags=4, image_size=32))
    models = Storage(f"{s3_bucket}/models/tiny")
    version = save(models, net, Labels(["a", "b", "c"], ["t0", "t1", "t2", "t3"]))
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 100, 0)).save(buf, format="JPEG")
    Storage(s3_bucket).write_bytes("uploads/1.jpg", buf.getvalue())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(buf.getvalue()[:100])
    proc = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "tag", f"{s3_bucket}/uploads/1.jpg", str(broken),
         "--checkpoint", models.uri, "--tags", "t1 unknown_tag", "--top-k", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    good, bad = (json.loads(line) for line in proc.stdout.splitlines())
    assert good["model"] == version and len(good["characters"]) == 2
    assert {c[0] for c in good["characters"]} <= {"a", "b", "c"}
    assert bad["image"] == str(broken) and "truncated" in bad["error"]
