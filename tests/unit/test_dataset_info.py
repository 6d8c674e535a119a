"""``dataset.json`` from another tool (DESIGN.md, "Dan:mul shards"): a dataset written with pyarrow directly,
whose ``dataset.json`` holds only the contract fields, loads (what is missing is derived from the shards) and
reads; a malformed ``dataset.json`` fails with a ValueError naming the file and the field, never a raw
TypeError or KeyError."""

from __future__ import annotations

import copy
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.schema import DATASET_JSON, SHARD_SCHEMA, SPLITS, DatasetInfo
from ingest.shards import CONTRACT_FIELDS, iter_examples, load_info, shard_paths
from ingest.stats import format_stats
from ingest.storage import Storage

# (post_id, character, tags, copyright) per split; images are a few opaque bytes: nothing here decodes them
ROWS = {
    "train": [
        [(1, "alice", ["smile", "hat"], ["series_x"]), (2, "bob", ["smile"], ["series_y"]),
         (3, "alice", ["smile"], ["series_x"])],
        [(4, "alice", [], ["series_x"]), (5, "bob", ["hat"], [])],
    ],
    "val": [[(6, "alice", ["smile"], ["series_x"]), (7, "bob", ["smile", "hat"], ["series_y", "series_x"])]],
}
MINIMAL = {
    "characters": ["alice", "bob"],
    "tags": ["smile", "hat"],
    "num_images": 7,
    "num_characters": 2,
    "avg_tags_per_image": 1.286,
    "splits": {"train": 5, "val": 2},  # no test split at all: neither a count nor a folder
    "filters": [{"name": "min_images", "removed_posts": 3}],
}


def write_foreign_dataset(root, meta: dict | None = MINIMAL) -> Storage:
    """Shards written with plain pyarrow (types inferred, no danmul code), plus files that are not shards."""
    for split, shards in ROWS.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, rows in enumerate(shards):
            table = pa.table({
                "post_id": [r[0] for r in rows],
                "image": [b"\xff\xd8 not really a jpeg %d" % r[0] for r in rows],
                "character": [r[1] for r in rows],
                "tags": [sorted(r[2]) for r in rows],
                "copyright": [sorted(r[3]) for r in rows],
                "rating": ["g" if r[0] % 2 else None for r in rows],
            })
            pq.write_table(table, root / split / f"part-{i:05d}.parquet", row_group_size=2)
    (root / "train" / "_SUCCESS").write_text("")
    (root / "train" / "stats.parquet").write_bytes(b"not a shard")  # not part-*.parquet: never read
    if meta is not None:
        (root / DATASET_JSON).write_text(json.dumps(meta))
    return Storage(str(root))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Storage:
    return write_foreign_dataset(tmp_path_factory.mktemp("foreign"))


def test_a_dataset_with_only_the_contract_fields_loads_and_reads(foreign):
    info = load_info(foreign)
    assert (info.characters, info.tags, info.num_images, info.num_characters) == (["alice", "bob"], ["smile", "hat"],
                                                                                   7, 2)
    assert info.splits == {"train": 5, "val": 2, "test": 0}
    assert info.shards == {"train": ["train/part-00000.parquet", "train/part-00001.parquet"],
                           "val": ["val/part-00000.parquet"], "test": []}
    # derived from the shards' label columns
    assert info.character_counts == [4, 3]
    assert info.tag_counts == [5, 3]
    assert info.copyrights == ["series_x", "series_y"]
    assert [(f.name, f.removed_posts, f.removed_classes) for f in info.filters] == [("min_images", 3, 0)]
    assert info.source == "unknown" and info.config == {} and info.tag_vocab_size == 2
    assert "min_images" in format_stats(info)

    rows = {s: list(iter_examples(foreign, s)) for s in SPLITS}
    assert [r["post_id"] for r in rows["train"]] == [1, 2, 3, 4, 5]
    assert [r["post_id"] for r in rows["val"]] == [6, 7] and rows["test"] == []
    assert rows["val"][1]["tags"] == ["hat", "smile"] and rows["train"][1]["rating"] is None
    assert set(rows["train"][0]) == set(SHARD_SCHEMA.names)
    assert next(iter_examples(foreign, "train", columns=["character"])) == {"character": "alice"}
    assert shard_paths(foreign, "val") == ["val/part-00000.parquet"]

    # what was derived round-trips as a full danmul dataset.json
    again = DatasetInfo(**{**info.__dict__})
    assert json.loads(again.to_json())["character_counts"] == [4, 3]


def test_fields_the_file_gives_are_kept_and_a_missing_split_count_comes_from_the_shards(tmp_path):
    meta = {**MINIMAL, "splits": {"val": 2}, "character_counts": [4, 3], "source": "other-tool",
            "shards": {"train": ["train/part-00001.parquet", "train/part-00000.parquet"], "val": []}}
    storage = write_foreign_dataset(tmp_path, meta)
    info = load_info(storage)
    assert info.splits == {"train": 5, "val": 2, "test": 0}  # train: from the shards' row counts
    assert info.shards["train"] == ["train/part-00001.parquet", "train/part-00000.parquet"]  # as listed
    assert info.shards["val"] == shard_paths(storage, "val") == ["val/part-00000.parquet"]  # [] -> listing
    assert info.character_counts == [4, 3] and info.tag_counts == [5, 3] and info.source == "other-tool"


def expect_error(storage: Storage, *needles: str, where: str = DATASET_JSON) -> str:
    """load_info fails with a ValueError naming the file (``where``) and every one of ``needles``."""
    with pytest.raises(ValueError) as e:
        load_info(storage)
    message = str(e.value)
    for needle in (storage.uri_of(where), *needles):
        assert needle in message, message
    return message


@pytest.mark.parametrize("field", sorted(CONTRACT_FIELDS))
def test_a_missing_contract_field_is_named(tmp_path, field):
    meta = {k: v for k, v in MINIMAL.items() if k != field}
    expect_error(write_foreign_dataset(tmp_path, meta), f"missing field {field!r}")


HOSTILE = [
    # (field, value, name in the message)
    ("characters", "alice", "'characters'"),
    ("characters", ["alice", 2], "'characters'"),
    ("characters", ["alice", ""], "'characters'"),
    ("characters", ["alice", "alice"], "'characters'"),
    ("characters", None, "'characters'"),
    ("tags", {"smile": 1}, "'tags'"),
    ("tags", [["smile"]], "'tags'"),
    ("num_images", -7, "'num_images'"),
    ("num_images", 7.0, "'num_images'"),
    ("num_images", True, "'num_images'"),
    ("num_images", "7", "'num_images'"),
    ("num_images", 8, "'splits'"),  # disagrees with the split counts
    ("num_characters", 3, "'num_characters'"),
    ("num_characters", -2, "'num_characters'"),
    ("avg_tags_per_image", "1.3", "'avg_tags_per_image'"),
    ("avg_tags_per_image", -1, "'avg_tags_per_image'"),
    ("avg_tags_per_image", math.inf, "'avg_tags_per_image'"),
    ("splits", [5, 2, 0], "'splits'"),
    ("splits", {"train": -5, "val": 2}, "'splits.train'"),
    ("splits", {"train": 5, "dev": 2}, "'splits'"),
    ("splits", {"train": 4, "val": 3}, "'splits'"),  # adds up, but not what the shards hold
    ("filters", {"min_images": 3}, "'filters'"),
    ("filters", [{"name": "min_images"}], "'filters[0]'"),
    ("filters", ["min_images"], "'filters[0]'"),
    ("filters", [{"name": "min_images", "removed_posts": -3}], "'filters[0].removed_posts'"),
    ("filters", [{"name": 1, "removed_posts": 3}], "'filters[0].name'"),
    ("filters", [{"name": "x", "removed_posts": 3, "detail": {"a": "b"}}], "'filters[0].detail.a'"),
    ("character_counts", [4], "'character_counts'"),
    ("character_counts", [4, -3], "'character_counts[1]'"),
    ("character_counts", [4, 4], "'character_counts'"),  # adds up to 8, not num_images
    ("tag_counts", "5,3", "'tag_counts'"),
    ("copyrights", [None], "'copyrights'"),
    ("shards", ["train/part-00000.parquet"], "'shards'"),
    ("shards", {"train": "train/part-00000.parquet"}, "'shards.train'"),
    ("shards", {"train": ["../../etc/part-00000.parquet"]}, "'shards.train'"),
    ("shards", {"train": ["train/../../outside.parquet"]}, "'shards.train'"),
    ("shards", {"train": ["/etc/train/part-00000.parquet"]}, "'shards.train'"),
    ("shards", {"train": ["val/part-00000.parquet"]}, "'shards.train'"),
    ("shards", {"dev": []}, "'shards'"),
    ("config", ["seed", 1], "'config'"),
    ("source", 3, "'source'"),
    ("format_version", "1", "'format_version'"),
    ("format_version", 99, "format 99"),
    ("tag_vocab_size", 3, "'tag_vocab_size'"),
]


@pytest.mark.parametrize(("field", "value", "named"), HOSTILE, ids=[f"{f}={v!r}" for f, v, _ in HOSTILE])
def test_a_malformed_field_is_named(tmp_path, field, value, named):
    expect_error(write_foreign_dataset(tmp_path, {**MINIMAL, field: value}), named)


def test_shards_that_disagree_with_the_file_are_named(tmp_path):
    storage = write_foreign_dataset(tmp_path, {**MINIMAL, "characters": ["alice", "carol"]})
    expect_error(storage, "'characters'", "'bob'")
    pq.write_table(pa.table({"post_id": [9], "character": ["alice"]}), tmp_path / "val" / "part-00001.parquet")
    storage = write_foreign_dataset(tmp_path, {**MINIMAL, "splits": {"train": 5}})
    message = expect_error(storage, where="val/part-00001.parquet")
    assert "image" in message and "tags" in message  # the columns it lacks


def test_shards_of_the_wrong_types_are_named(tmp_path):
    storage = write_foreign_dataset(tmp_path)
    table = pq.read_table(tmp_path / "val" / "part-00000.parquet")
    table = table.set_column(table.schema.get_field_index("tags"), "tags", pa.array(["smile", "hat smile"]))
    pq.write_table(table, tmp_path / "val" / "part-00000.parquet")
    message = expect_error(storage, "'tags'", where="val/part-00000.parquet")
    assert "list<" in message


def test_nulls_inside_label_lists_are_not_counted(tmp_path):
    storage = write_foreign_dataset(tmp_path)
    table = pa.table({"post_id": [8], "image": [b"x"], "character": ["bob"], "tags": [["hat", None]],
                      "copyright": [[None]], "rating": [None]})
    pq.write_table(table, tmp_path / "val" / "part-00001.parquet")
    (tmp_path / DATASET_JSON).write_text(json.dumps({**MINIMAL, "num_images": 8, "splits": {"train": 5, "val": 3}}))
    info = load_info(storage)
    assert info.character_counts == [4, 4] and info.tag_counts == [5, 4] and None not in info.copyrights


@pytest.mark.parametrize("content", [b"", b"not json", b"\xff\xfe\x00garbage", b'{"characters": [', b"[1, 2]",
                                     b'"characters"', b"null", b"[" * 100_000])
def test_a_file_that_is_not_a_json_object_is_named(tmp_path, content):
    storage = write_foreign_dataset(tmp_path, None)
    (tmp_path / DATASET_JSON).write_bytes(content)
    expect_error(storage)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
FIELDS = [*CONTRACT_FIELDS, "character_counts", "tag_counts", "copyrights", "shards", "config", "source",
          "format_version", "tag_vocab_size"]


@settings(max_examples=150, deadline=None)
@given(edits=st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=3), drop=st.booleans())
def test_any_json_in_any_field_loads_or_fails_with_a_value_error(foreign, edits, drop):
    meta = copy.deepcopy(MINIMAL)
    for field, value in edits.items():
        if drop:
            meta.pop(field, None)
        else:
            meta[field] = value
    with open(foreign.path(DATASET_JSON), "w") as f:
        f.write(json.dumps(meta))
    try:
        info = load_info(foreign)
    except ValueError as e:
        assert foreign.uri_of(DATASET_JSON) in str(e)
    else:
        assert info.num_characters == len(info.characters) and sum(info.splits.values()) == info.num_images
    finally:
        with open(foreign.path(DATASET_JSON), "w") as f:
            f.write(json.dumps(MINIMAL))
