"""The look-alike dataset (``tests/lookalike.py``), made the way another tool would make one: it loads
through the contract alone, and its characters are what the training-defaults benchmark needs (families
that share every visible trait, told apart by an emblem the tags name)."""

from __future__ import annotations

import json
from collections import defaultdict

from lookalike import generate, make_families

from ingest.shards import iter_examples, load_info
from ingest.storage import Storage


def test_a_contract_only_dataset_that_loads_and_splits_every_character(tmp_path):
    out = generate(str(tmp_path / "d"), characters=6, images=90, size=64, seed=3)
    raw = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert "character_counts" not in raw and "format_version" not in raw  # only the contract's fields
    info = load_info(Storage(out))
    assert info.num_characters == 6 and sum(info.splits.values()) == 90
    seen = defaultdict(set)
    for split in ("train", "val", "test"):
        for row in iter_examples(Storage(out), split):
            seen[split].add(row["character"])
            assert row["image"][:2] == b"\xff\xd8" and set(row["tags"]) <= set(info.tags)
    assert all(seen[split] == set(info.characters) for split in ("train", "val", "test"))


def test_family_members_look_alike_and_the_tags_name_what_tells_them_apart(tmp_path):
    import random

    chars = make_families(9, random.Random(0))
    families = defaultdict(list)
    for c in chars:
        families[c["name"].split("_")[0]].append(c)
    assert [len(f) for f in families.values()] == [3, 3, 3]
    looks = ("hair", "hair_shape", "eyes", "outfit", "outfit_colour", "headwear", "backdrop")
    for members in families.values():
        assert len({tuple(m[k] for k in looks) for m in members}) == 1  # the same at a glance
        assert len({(m["emblem"], m["emblem_colour"]) for m in members}) == 3  # told apart by the emblem
    out = generate(str(tmp_path / "d"), characters=9, images=120, size=64, seed=0)
    emblem_of = {c["name"]: f"{c['emblem']}_emblem" for c in make_families(9, random.Random(0))}
    rows = list(iter_examples(Storage(out), "train"))
    named = sum(emblem_of[r["character"]] in r["tags"] for r in rows)
    assert 0.8 * len(rows) <= named < len(rows)  # the tags name it, with an uploader's misses


def test_the_emblem_shows_in_the_picture_unless_something_is_held_in_front_of_it():
    """What tells family members apart is in the image: long or drill hair falls behind the back and does
    not cover the chest, so only a held object hides the emblem (and now and then a close-up's frame)."""
    import io
    import random

    import numpy as np
    from lookalike import HAIR_SHAPES, draw
    from PIL import Image

    violet = np.array([150, 50, 210])
    for shape in HAIR_SHAPES:
        char = {"hair": "green", "hair_shape": shape, "eyes": "blue", "outfit": "tunic", "outfit_colour": "white",
                "headwear": "none", "backdrop": "plain_background", "emblem": "diamond", "emblem_colour": "violet"}
        shown = {True: [], False: []}  # held in front or not -> whether violet pixels show
        for seed in range(24):
            image, tags = draw(char, 128, random.Random(seed))
            pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(int)
            shown["holding_object" in tags].append(int((np.abs(pixels - violet).sum(-1) < 90).sum()) >= 5)
        assert not any(shown[True]), shape
        assert sum(shown[False]) >= 0.8 * len(shown[False]) > 0, (shape, shown[False])
