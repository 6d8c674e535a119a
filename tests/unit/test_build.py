"""``data build`` on handmade Danbooru metadata holding every messy case, into a local folder.

(The same build against a real S3 API is in tests/integration/test_s3.py.)"""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ingest.build import BuildConfig, build
from ingest.schema import SHARD_SCHEMA, SPLITS
from ingest.shards import iter_examples, load_info
from ingest.storage import Storage


def jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def api_post(pid, character, general, **extra) -> str:
    return json.dumps({
        "id": pid, "rating": "s", "tag_string_general": " ".join(general),
        "tag_string_character": character, "tag_string_copyright": "series_x",
        "tag_string_artist": "artist_y", "tag_string_meta": "highres", **extra,
    })


def legacy_post(pid, character, general) -> str:
    tags = [{"name": t, "category": "0"} for t in general]
    tags += [{"name": character, "category": "4"}, {"name": "series_x", "category": "3"},
             {"name": "artist_y", "category": "1"}, {"name": "absurdres", "category": "5"}]
    return json.dumps({"id": str(pid), "rating": "q", "is_deleted": "false", "tags": tags})


def make_danbooru(root: Storage) -> dict:
    """Two metadata files and an image tree; returns what a correct build must report."""
    lines_a, lines_b = [], []
    pid = 100
    # alice: 12 posts (half legacy encoding), bob: 10, carol: 9 (below min_images=10)
    for i in range(12):
        pid += 1
        general = ["common", "mid"] if i < 5 else ["common"]
        if i == 0:
            general.append("rare")
        lines_a.append(legacy_post(pid, "alice", general) if i % 2 else api_post(pid, "alice", general))
    for _ in range(10):
        pid += 1
        lines_a.append(api_post(pid, "bob", ["common", "bob_tag"]))
    for _ in range(9):
        pid += 1
        lines_b.append(api_post(pid, "carol", ["common", "carol_tag"]))
    good_ids = list(range(101, pid + 1))
    # the mess, all in file b, with known line numbers (1-based; carol's 9 lines come first)
    mess = [
        ('{"id": 900, "tags": [', "malformed_json"),  # line 10
        (json.dumps({"rating": "s", "tag_string_general": "x"}), "no_id"),  # line 11
        (api_post(901, "alice", ["common"], is_deleted="true"), "deleted"),
        (api_post(902, "alice", ["common"], is_banned=True), "banned"),
        (api_post(903, "alice", ["common"]), "missing_image"),  # no file for 903
        (api_post(101, "alice", ["common"]), "duplicate_id"),  # 101 again
        (api_post(904, "", ["common"]), "no_character"),
        (api_post(905, "alice bob", ["common"]), "multiple_characters"),
        (json.dumps({"id": 906, "tag_string": "alice common"}), "no_tag_categories"),
        ("", None),  # blank lines are skipped silently
    ]
    lines_b += [text for text, _ in mess]
    root.write_text("meta/posts000000000000.json", "\n".join(lines_a) + "\n")
    root.write_text("meta/posts000000000001.json", "\n".join(lines_b) + "\n")
    root.write_text("meta/README.txt", "not metadata")
    for i in good_ids:
        root.write_bytes(f"512px/{i % 1000:04d}/{i}.jpg", jpeg())
    for i in (901, 902, 904, 905, 906):
        root.write_bytes(f"512px/{i % 1000:04d}/{i}.jpg", jpeg())
    root.write_bytes("512px/0113/113.jpg", b"this is not an image")  # bob's first post
    return {"reasons": Counter(r for _, r in mess if r), "lines": len(lines_a) + len(lines_b) - 1}


@pytest.fixture
def danbooru(tmp_path):
    root = Storage(str(tmp_path / "danbooru"))
    expected = make_danbooru(root)
    return root, expected


def run_build(root: Storage, out: str, **overrides):
    cfg = BuildConfig(metadata=root.uri_of("meta"), images=root.uri_of("512px"), out=out,
                      min_images=10, min_tag_count=3, **overrides)
    return build(cfg, progress=False, log=lambda s: None)


def test_counts_every_filter(danbooru, tmp_path):
    root, expected = danbooru
    result = run_build(root, str(tmp_path / "out"))
    info = result.info
    assert result.lines == expected["lines"]
    steps = {f.name: f for f in info.filters}
    assert steps["parse"].detail == {"malformed_json": 1, "no_id": 1, "no_tag_categories": 1}
    assert steps["deleted_banned"].removed_posts == 2
    assert steps["image_exists"].removed_posts == 1
    assert steps["duplicate_id"].removed_posts == 1
    assert steps["one_character"].detail == {"no_character": 1, "multiple_characters": 1}
    assert steps["min_images"].removed_classes == 1 and steps["min_images"].removed_posts == 9
    assert steps["image_read"].detail == {"not_an_image": 1}
    # malformed lines are reported by file and line number
    assert "posts000000000001.json:10 malformed_json" in steps["parse"].examples
    assert "posts000000000001.json:11 no_id" in steps["parse"].examples

    assert info.characters == ["alice", "bob"]
    assert info.num_images == 12 + 10 - 1
    assert info.character_counts == [12, 9]
    # tags counted over alice+bob posts: common 22, bob_tag 10, mid 5, rare 1 (< 3: dropped)
    assert info.tags == ["common", "bob_tag", "mid"]
    assert steps["tag_importance"].detail["tags_removed"] == 1
    assert sum(info.splits.values()) == info.num_images


def test_shards_follow_the_contract(danbooru, tmp_path):
    root, _ = danbooru
    out = Storage(str(tmp_path / "out"))
    info = run_build(root, out.uri).info
    assert load_info(out).to_json() == info.to_json()
    rows = []
    for split in SPLITS:
        for rel in info.shards[split]:
            assert pq.read_schema(out.path(rel)).equals(SHARD_SCHEMA)
        rows += [(split, r) for r in iter_examples(out, split)]
    assert len(rows) == info.num_images
    by_char = Counter(r["character"] for _, r in rows)
    assert by_char == {"alice": 12, "bob": 9}
    for _, r in rows:
        assert r["tags"] == sorted(r["tags"]) and set(r["tags"]) <= set(info.tags)
        assert "highres" not in r["tags"] and "artist_y" not in r["tags"] and "alice" not in r["tags"]
        assert r["copyright"] == ["series_x"]
        assert r["rating"] in ("s", "q")
        assert Image.open(io.BytesIO(r["image"])).size == (16, 16)
    train_chars = {r["character"] for s, r in rows if s == "train"}
    assert train_chars == {"alice", "bob"}


def test_split_is_deterministic_for_a_seed(danbooru, tmp_path):
    root, _ = danbooru

    def assignment(out: str, seed: int) -> dict[int, str]:
        run_build(root, out, seed=seed)
        return {r["post_id"]: s for s in SPLITS for r in iter_examples(Storage(out), s, ["post_id"])}

    a = assignment(str(tmp_path / "a"), 0)
    assert assignment(str(tmp_path / "b"), 0) == a
    assert assignment(str(tmp_path / "c"), 7) != a


def test_max_tags_keeps_the_most_frequent(danbooru, tmp_path):
    root, _ = danbooru
    info = run_build(root, str(tmp_path / "out"), max_tags=2).info
    assert info.tags == ["common", "bob_tag"]


def test_shards_are_bounded_in_size(danbooru, tmp_path):
    root, _ = danbooru
    out = Storage(str(tmp_path / "out"))
    info = run_build(root, out.uri, shard_mb=1500 / (1 << 20)).info  # ~1.5 KB of images per shard
    assert len(info.shards["train"]) > 3
    for rel in info.shards["train"]:
        images = pq.read_table(out.path(rel), columns=["image"]).column("image").to_pylist()
        assert len(images) == 1 or sum(map(len, images)) <= 1500


def test_refuses_to_overwrite_unless_asked(danbooru, tmp_path):
    root, _ = danbooru
    out = str(tmp_path / "out")
    run_build(root, out)
    with pytest.raises(FileExistsError):
        run_build(root, out)
    assert run_build(root, out, overwrite=True).info.num_images == 21


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata"):
        build(BuildConfig(metadata=str(tmp_path), images=str(tmp_path), out=str(tmp_path / "o")),
              progress=False, log=lambda s: None)


def test_oversized_images_are_counted_not_fatal(danbooru, tmp_path):
    root, _ = danbooru
    info = run_build(root, str(tmp_path / "out"), max_image_mb=100 / (1 << 20)).info  # 100-byte cap
    steps = {f.name: f for f in info.filters}
    assert steps["image_read"].detail == {"image_too_large": 21, "not_an_image": 1}
    assert info.num_images == 0
