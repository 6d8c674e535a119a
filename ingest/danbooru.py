"""Parsing Danbooru2021-style post metadata, one JSON object per line, as found in the wild.

Two tag encodings exist: the API's ``tag_string_general`` / ``tag_string_character`` /
``tag_string_copyright`` / ``tag_string_artist`` / ``tag_string_meta`` strings (Danbooru2021), and a
``tags`` list of ``{"name", "category"}`` objects (Danbooru2017-2020 dumps), where category
0 = general, 1 = artist, 3 = copyright, 4 = character, 5 = meta. Numbers and booleans are often
serialized as strings. A line that cannot be used raises :class:`BadPost` with a short reason code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ingest.schema import RATINGS

GENERAL, ARTIST, COPYRIGHT, CHARACTER, META = 0, 1, 3, 4, 5
_STRING_FIELDS = {
    GENERAL: "tag_string_general",
    ARTIST: "tag_string_artist",
    COPYRIGHT: "tag_string_copyright",
    CHARACTER: "tag_string_character",
    META: "tag_string_meta",
}
_RATING_WORDS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e", "safe": "s"}
_TRUE = {"true", "t", "1", "yes", "y"}
_FALSE = {"false", "f", "0", "no", "n", ""}


class BadPost(ValueError):
    """A metadata line that cannot become a post; ``reason`` is a short code for the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class Post:
    post_id: int
    general: list[str]
    characters: list[str]
    copyright: list[str]
    rating: str | None
    deleted: bool
    banned: bool


def parse_line(line: bytes | str) -> Post:
    """One metadata line -> :class:`Post`, or :class:`BadPost` (``malformed_json``, ``not_an_object``,
    ``no_id``, ``bad_id``, ``bad_tags``, ``no_tag_categories``)."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadPost("malformed_json", str(e)[:80]) from None
    if not isinstance(obj, dict):
        raise BadPost("not_an_object", type(obj).__name__)
    return parse_post(obj)


def parse_post(obj: dict[str, Any]) -> Post:
    post_id = _parse_id(obj.get("id"))
    by_category = _parse_tags(obj)
    return Post(
        post_id=post_id,
        general=by_category.get(GENERAL, []),
        characters=by_category.get(CHARACTER, []),
        copyright=by_category.get(COPYRIGHT, []),
        rating=parse_rating(obj.get("rating")),
        deleted=parse_bool(obj.get("is_deleted")),
        banned=parse_bool(obj.get("is_banned")),
    )


def _parse_id(value: Any) -> int:
    if value is None or value == "":
        raise BadPost("no_id")
    if isinstance(value, bool):
        raise BadPost("bad_id", repr(value))
    if isinstance(value, int):
        post_id = value
    elif isinstance(value, float) and value.is_integer():
        post_id = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        post_id = int(value.strip())
    else:
        raise BadPost("bad_id", repr(value)[:40])
    if post_id <= 0:
        raise BadPost("bad_id", str(post_id))
    return post_id


def _parse_tags(obj: dict[str, Any]) -> dict[int, list[str]]:
    """Tags by category from either encoding; names deduplicated, order kept."""
    out: dict[int, list[str]] = {}
    if any(f in obj for f in _STRING_FIELDS.values()):
        for cat, fname in _STRING_FIELDS.items():
            value = obj.get(fname) or ""
            if not isinstance(value, str):
                raise BadPost("bad_tags", f"{fname} is {type(value).__name__}")
            out[cat] = _dedupe(value.split())
        return out
    tags = obj.get("tags")
    if isinstance(tags, list):
        for t in tags:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise BadPost("bad_tags", "tags entry without a name")
            try:
                cat = int(t.get("category"))
            except (TypeError, ValueError):
                raise BadPost("bad_tags", f"category {t.get('category')!r}") from None
            name = t["name"].strip()
            if name:
                out.setdefault(cat, []).append(name)
        return {c: _dedupe(v) for c, v in out.items()}
    if "tag_string" in obj:  # all tags in one string: the categories cannot be recovered
        raise BadPost("no_tag_categories")
    raise BadPost("bad_tags", "no tags")


def _dedupe(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int | float):
        return value != 0
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return False


def parse_rating(value: Any) -> str | None:
    """``"s"``, ``"safe"``, ``"Explicit"`` ... -> one of g/s/q/e, or None when absent or unknown."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().lower()
    if text in RATINGS:
        return text
    return _RATING_WORDS.get(text)


def image_relpath(post_id: int, ext: str = "jpg") -> str:
    """Where Danbooru2021's 512px tree keeps a post: ``{id % 1000:04d}/{id}.jpg``."""
    return f"{post_id % 1000:04d}/{post_id}.{ext}"
