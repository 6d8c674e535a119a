"""Parsing real-world Danbooru metadata lines: every messy case the dumps contain."""

import json

import pytest

from ingest.danbooru import BadPost, image_relpath, parse_bool, parse_line, parse_rating


def line(**fields) -> str:
    return json.dumps(fields)


def test_api_tag_strings():
    post = parse_line(line(
        id=123, rating="s", tag_string_general="1girl solo long_hair solo",
        tag_string_character="hatsune_miku", tag_string_copyright="vocaloid",
        tag_string_artist="someone", tag_string_meta="highres",
    ))
    assert post.post_id == 123
    assert post.general == ["1girl", "solo", "long_hair"]  # duplicates dropped, order kept
    assert post.characters == ["hatsune_miku"]
    assert post.copyright == ["vocaloid"]
    assert post.rating == "s"
    assert not post.deleted and not post.banned


def test_legacy_tag_objects_with_string_numbers():
    post = parse_line(line(
        id="4567", rating="q", is_deleted="false", is_banned="0",
        tags=[
            {"id": "1", "name": "1girl", "category": "0"},
            {"id": "2", "name": "artist_x", "category": "1"},
            {"id": "3", "name": "touhou", "category": "3"},
            {"id": "4", "name": "hakurei_reimu", "category": "4"},
            {"id": "5", "name": "absurdres", "category": "5"},
            {"id": "6", "name": "red_bow", "category": 0},
        ],
    ))
    assert post.post_id == 4567
    assert post.general == ["1girl", "red_bow"]
    assert post.characters == ["hakurei_reimu"]
    assert post.copyright == ["touhou"]
    assert post.rating == "q"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"id": 1, "tags": [', "malformed_json"),
        ("not json at all", "malformed_json"),
        ("[1, 2, 3]", "not_an_object"),
        (line(rating="s", tag_string_general="1girl"), "no_id"),
        (line(id="", tag_string_general="1girl"), "no_id"),
        (line(id="abc", tag_string_general="1girl"), "bad_id"),
        (line(id=-5, tag_string_general="1girl"), "bad_id"),
        (line(id=True, tag_string_general="1girl"), "bad_id"),
        (line(id=7, tag_string="1girl solo"), "no_tag_categories"),
        (line(id=7), "bad_tags"),
        (line(id=7, tags=[{"category": "0"}]), "bad_tags"),
        (line(id=7, tags=[{"name": "x", "category": "general"}]), "bad_tags"),
        (line(id=7, tag_string_general=["1girl"]), "bad_tags"),
    ],
)
def test_bad_lines_have_reason_codes(text, reason):
    with pytest.raises(BadPost) as err:
        parse_line(text)
    assert err.value.reason == reason


def test_ids_as_string_and_float():
    assert parse_line(line(id=" 42 ", tag_string_general="a")).post_id == 42
    assert parse_line(line(id=42.0, tag_string_general="a")).post_id == 42
    with pytest.raises(BadPost):
        parse_line(line(id=42.5, tag_string_general="a"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), ("True", True), ("false", False), ("1", True),
     ("0", False), (1, True), (0, False), (None, False), ("", False), ("t", True)],
)
def test_booleans_in_the_wild(value, expected):
    assert parse_bool(value) is expected


def test_deleted_and_banned_flags():
    assert parse_line(line(id=1, tag_string_general="a", is_deleted="true")).deleted
    assert parse_line(line(id=1, tag_string_general="a", is_banned=True)).banned


@pytest.mark.parametrize(
    ("value", "expected"),
    [("s", "s"), ("G", "g"), ("explicit", "e"), ("Questionable", "q"), ("safe", "s"), ("x", None),
     (None, None), ("", None), (3, None)],
)
def test_ratings(value, expected):
    assert parse_rating(value) == expected


def test_image_relpath_follows_the_512px_tree():
    assert image_relpath(1234567) == "0567/1234567.jpg"
    assert image_relpath(5) == "0005/5.jpg"
