"""Object storage on a local folder (the S3 half runs against a real S3 API in tests/integration)."""

import gzip
import os

import pyarrow as pa
import pytest

from ingest.storage import NotFound, Storage, StorageError, resolve


def test_roundtrip_list_and_delete(tmp_path):
    s = Storage(str(tmp_path / "root"))
    assert not s.exists()
    s.write_bytes("a/b/one.bin", b"1")
    s.write_text("a/two.txt", "two")
    s.write_bytes("three.bin", b"333")
    assert s.read_bytes("a/b/one.bin") == b"1"
    assert s.read_text("a/two.txt") == "two"
    assert s.is_file("three.bin") and not s.is_file("a")
    assert s.size("three.bin") == 3
    assert [(e.path, e.size) for e in s.list()] == [("a/b/one.bin", 1), ("a/two.txt", 3), ("three.bin", 3)]
    assert [e.path for e in s.list("a", recursive=False)] == ["two.txt"]
    assert [e.path for e in s.list(suffixes=(".txt",))] == ["a/two.txt"]
    assert s.list("absent") == []
    s.delete("three.bin")
    s.delete("three.bin")  # deleting twice is fine
    s.delete_prefix("a")
    assert s.list() == []
    # atomic local writes leave no temporary files behind
    assert not [f for f in os.listdir(tmp_path / "root") if ".tmp-" in f]


def test_child_and_uris(tmp_path):
    s = Storage(str(tmp_path))
    c = s.child("x/y")
    c.write_bytes("z", b"!")
    assert s.read_bytes("x/y/z") == b"!"
    assert c.uri_of("z") == f"{tmp_path}/x/y/z"
    assert Storage(f"file://{tmp_path}").read_bytes("x/y/z") == b"!"


def test_missing_and_oversized(tmp_path):
    s = Storage(str(tmp_path))
    with pytest.raises(NotFound):
        s.read_bytes("nope")
    with pytest.raises(FileNotFoundError):  # NotFound is also a FileNotFoundError
        s.size("nope")
    s.write_bytes("big", b"x" * 100)
    assert s.read_bytes("big", max_bytes=100) == b"x" * 100
    with pytest.raises(StorageError, match="limit"):
        s.read_bytes("big", max_bytes=99)


def test_open_lines_streams_plain_and_gzip(tmp_path):
    s = Storage(str(tmp_path))
    s.write_bytes("plain.json", b'{"a": 1}\r\n{"b": 2}\n\nlast-no-newline')
    assert list(s.open_lines("plain.json")) == [b'{"a": 1}', b'{"b": 2}', b"", b"last-no-newline"]
    s.write_bytes("packed.json.gz", gzip.compress(b"x\ny\n"))
    assert list(s.open_lines("packed.json.gz")) == [b"x", b"y"]


def test_parquet_roundtrip(tmp_path):
    s = Storage(str(tmp_path))
    table = pa.table({"post_id": [1, 2], "tags": [["a"], []]})
    s.write_parquet("t/part.parquet", table)
    assert s.read_parquet("t/part.parquet").equals(table)
    assert s.parquet_file("t/part.parquet").metadata.num_rows == 2


@pytest.mark.parametrize("uri", ["", "http://example.com/x", "gs://bucket/x", "s3://"])
def test_unsupported_uris_are_clear_errors(uri):
    with pytest.raises(ValueError):
        resolve(uri)


def test_s3_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = resolve("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix"
    assert fs.type_name == "s3"
