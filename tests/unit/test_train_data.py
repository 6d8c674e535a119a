"""Reading a split for training: which files are shards, and a foreign shard that cannot be trained on is
an error that names it (no Ray: the per-shard read)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ingest.storage import Storage
from ray_jobs.train_data import _is_shard, _read_shard


@pytest.mark.parametrize(("path", "read"), [
    ("part-00000.parquet", True), ("PART-1.PARQUET", True), ("sub/part-2.parquet", True),
    ("_temporary/0/part-0.parquet", False), (".part-0.parquet", False), ("sub/_SUCCESS", False),
    ("notes.json", False), ("part-0.parquet.tmp", False),
])  # fmt: skip
def test_the_files_read_are_those_ray_data_would_read(path, read):
    assert _is_shard(path) is read


def write(storage: Storage, name: str, columns: dict) -> str:
    storage.write_parquet(f"train/{name}", pa.table(columns))
    return f"train/{name}"


def test_a_shard_reads_as_its_training_columns_in_the_shard_types(tmp_path):
    storage = Storage(str(tmp_path))
    rel = write(storage, "part-0.parquet", {"post_id": [1], "image": pa.array([b"x"], pa.large_binary()),
                                            "character": ["a"], "tags": [["t1", "t2"]]})
    table = _read_shard(storage, rel)
    assert table.column_names == ["image", "character", "tags"] and table.num_rows == 1
    assert table.schema.field("image").type == pa.binary()


@pytest.mark.parametrize("columns", [
    {"image": [b"x"], "character": ["a"]},  # no tags column
    {"image": [b"x"], "character": ["a"], "tags": [None]},  # a null where the schema has none
    {"image": [None], "character": ["a"], "tags": [["t"]]},
])  # fmt: skip
def test_a_shard_that_cannot_be_trained_on_is_an_error_that_names_it(tmp_path, columns):
    storage = Storage(str(tmp_path))
    rel = write(storage, "part-9.parquet", columns)
    with pytest.raises(ValueError, match=r"part-9\.parquet: not a Dan:mul shard"):
        _read_shard(storage, rel)
