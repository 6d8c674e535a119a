"""Tags that come with an upload (the text modality of an image someone else tagged): the one parser every
front end uses (the Redis stream, the HTTP API, ``danmul tag``), with the limits untrusted input needs."""

from __future__ import annotations

MAX_TAG_LENGTH = 200  # characters; longer "tags" are not Danbooru tags
MAX_TAGS_PER_INPUT = 1000  # tags accepted from one upload before we call it absurd


def parse_tag_string(text: str) -> list[str]:
    """A space-separated Danbooru tag string from an upload -> tags, first occurrences in order. Raises
    ValueError on absurd input (too many tags, absurdly long tags, control characters)."""
    if len(text) > MAX_TAGS_PER_INPUT * (MAX_TAG_LENGTH + 1):
        raise ValueError("tag string too long")
    tags = text.split()
    if len(tags) > MAX_TAGS_PER_INPUT:
        raise ValueError(f"{len(tags)} tags > {MAX_TAGS_PER_INPUT}")
    for t in tags:
        if len(t) > MAX_TAG_LENGTH:
            raise ValueError(f"a tag of {len(t)} characters")
        if not t.isprintable():
            raise ValueError("control characters in tags")
    return list(dict.fromkeys(tags))
