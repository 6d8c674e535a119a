"""Parsing what a platform puts in an upload entry: its fields (reason codes for anything that can never
succeed) and the tag string that comes with it."""

from __future__ import annotations

import pytest

from ingest.queue import BadUpload, Upload, parse_upload
from ingest.tags import parse_tag_string

LIMIT = 1000


def up(**fields) -> Upload:
    return Upload("1700000000000-0", {k: v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()})


@pytest.mark.parametrize("fields,reason", [
    ({"image": b"x"}, "missing_post_id"),
    ({"post_id": " ", "image": b"x"}, "missing_post_id"),
    ({"post_id": "12a", "image": b"x"}, "bad_post_id"),
    ({"post_id": "-3", "image": b"x"}, "bad_post_id"),
    ({"post_id": "1_000_001", "image": b"x"}, "bad_post_id"),  # int() takes these; they name other keys
    ({"post_id": " +77 ", "image": b"x"}, "bad_post_id"),
    ({"post_id": "１２３", "image": b"x"}, "bad_post_id"),  # full-width digits
    ({"post_id": "42\n", "image": b"x"}, "bad_post_id"),
    ({"post_id": "9223372036854775808", "image": b"x"}, "bad_post_id"),  # 2**63
    ({"post_id": "1" * 20, "image": b"x"}, "bad_post_id"),
    ({"post_id": "0005", "image": b"x"}, "bad_post_id"),  # result:5 is not what a platform that sent 0005 reads
    ({"post_id": "7"}, "missing_image"),
    ({"post_id": "7", "image_uri": "  "}, "missing_image"),
    ({"post_id": "7", "image": b"x" * (LIMIT + 1)}, "too_large"),
    ({"post_id": "7", "image": b"x", "tags": "a " * 5000}, "bad_tags"),
    ({"post_id": "7", "image": b"x", "tags": "ok\x07bell"}, "bad_tags"),
    ({"post_id": "7", "image_uri": b"\xff\xfe"}, "bad_image_uri"),
])  # fmt: skip
def test_bad_uploads_get_a_reason(fields, reason):
    with pytest.raises(BadUpload) as e:
        parse_upload(up(**fields), LIMIT)
    assert e.value.reason == reason


def test_good_upload_is_parsed():
    req = parse_upload(up(post_id="42", image_uri=" s3://b/42.jpg ", tags="1girl solo 1girl"), LIMIT)
    assert (req.post_id, req.image_uri, req.image, req.tags) == (42, "s3://b/42.jpg", None, ["1girl", "solo"])
    assert parse_upload(up(post_id="1", image=b"abc"), LIMIT).tags is None  # no tags: image-only
    assert up(post_id="1").enqueued_at == 1700000000.0
    assert parse_upload(up(post_id="9223372036854775807", image=b"a"), LIMIT).post_id == 2**63 - 1
    assert parse_upload(up(post_id="0", image=b"a"), LIMIT).post_id == 0
    with pytest.raises(BadUpload, match="out of range"):
        parse_upload(up(post_id="1" * 26, image=b"a"), LIMIT)


def test_tag_strings_from_uploads():
    assert parse_tag_string("1girl  solo 1girl\tblue_hair") == ["1girl", "solo", "blue_hair"]
    assert parse_tag_string("") == []
    for absurd in ("x" * 500, " ".join(["t"] * 2000), "bad\x00tag"):
        with pytest.raises(ValueError):
            parse_tag_string(absurd)


def test_post_id_from_a_file_name():
    from ingest.schema import post_id_from_name

    assert post_id_from_name("s3://archive/512px/0123/4560123.jpg") == 4560123
    assert post_id_from_name("/uploads/7.webp") == 7
    for name in ("cover.png", "12a.jpg", "１２３.jpg", "-5.png", ""):  # fullwidth digits are not ASCII
        assert post_id_from_name(name) is None
