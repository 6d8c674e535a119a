"""The synthetic Dan:mul generator: class counts, tags per image, the long tail, determinism, and
that the data is learnable but not trivial (cheap classifiers beat chance and stay far from 100%)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ingest.schema import SPLITS
from ingest.shards import iter_examples
from ingest.stats import long_tail
from ingest.storage import Storage
from ingest.synth import SynthConfig, class_sizes, make_cast, synthesize, tag_vocabulary


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = Storage(str(tmp_path_factory.mktemp("synth") / "data"))
    cfg = SynthConfig(out=out.uri, characters=24, images=960, image_size=64, seed=3, workers=1)
    info = synthesize(cfg, progress=False)
    rows = {s: list(iter_examples(out, s)) for s in SPLITS}
    return cfg, info, rows


def test_counts_and_long_tail(dataset):
    cfg, info, rows = dataset
    assert info.num_images == cfg.images == sum(len(r) for r in rows.values())
    assert info.num_characters == cfg.characters
    assert min(info.character_counts) >= cfg.min_images
    tail = long_tail(info)
    assert tail["max"] >= 4 * tail["min"]  # a long tail, not a balanced set
    assert tail["gini"] > 0.25
    # every class is in train, and val/test hold about 10% each
    assert {r["character"] for r in rows["train"]} == set(info.characters)
    assert 0.07 < len(rows["val"]) / cfg.images < 0.13


def test_class_sizes():
    sizes = class_sizes(50, 5000, 10, 1.0, seed=0)
    assert sizes.sum() == 5000 and sizes.min() >= 10 and sizes.max() > 10 * np.median(sizes) / 2
    balanced = class_sizes(50, 5000, 10, 0.0, seed=0)
    assert balanced.max() - balanced.min() < 40
    with pytest.raises(ValueError):
        class_sizes(50, 400, 10, 1.0, seed=0)


def test_tags_look_like_danbooru(dataset):
    _, info, rows = dataset
    all_rows = [r for split in rows.values() for r in split]
    per_image = [len(r["tags"]) for r in all_rows]
    assert 20 <= np.mean(per_image) <= 25
    assert 20 <= info.avg_tags_per_image <= 25
    assert set(info.tags) <= set(tag_vocabulary())
    counts = Counter(t for r in all_rows for t in r["tags"])
    assert counts["solo"] > 0.85 * len(all_rows)  # present but sometimes dropped: tag noise
    assert counts["solo"] < len(all_rows)
    assert all(len(r["copyright"]) == 1 for r in all_rows)
    assert all(r["tags"] == sorted(r["tags"]) for r in all_rows)


def test_images_decode_in_several_formats_and_shapes(dataset):
    cfg, _, rows = dataset
    formats, shapes = Counter(), set()
    for r in rows["train"][:300]:
        img = Image.open(io.BytesIO(r["image"]))
        img.load()
        formats[img.format] += 1
        shapes.add(img.size)
        assert max(img.size) == cfg.image_size
    assert formats["JPEG"] > formats["PNG"] > 0
    assert any(w != h for w, h in shapes)  # not every image is square: letterboxing matters


def test_cast_shares_attributes_and_has_siblings():
    cfg = SynthConfig(out="unused", characters=60, seed=0)
    cast = make_cast(cfg)
    assert len({c.name for c in cast}) == 60
    assert len({c.signature() for c in cast}) == 60
    # no single attribute value identifies a character: the common values are shared
    hair = Counter(c.hair_color for c in cast)
    assert max(hair.values()) >= 3 and len(hair) >= 6
    siblings = [c for c in cast if c.sibling_of]
    assert len(siblings) >= 6
    by_name = {c.name: c for c in cast}
    for s in siblings:
        base = by_name[s.sibling_of]
        diff = {k for k in ("eye_color", "accessories") if getattr(s, k) != getattr(base, k)}
        same = {k for k in ("hair_color", "hair_length", "outfit", "outfit_color", "series")
                if getattr(s, k) == getattr(base, k)}
        assert len(diff) == 1 and len(same) == 5


def test_same_seed_same_bytes(tmp_path):
    def make(out, seed):
        synthesize(SynthConfig(out=out, characters=6, images=80, image_size=48, seed=seed, workers=1),
                   progress=False)
        return [(r["post_id"], r["image"], r["tags"]) for r in iter_examples(Storage(out), "train")]

    a = make(str(tmp_path / "a"), 5)
    assert make(str(tmp_path / "b"), 5) == a
    assert make(str(tmp_path / "c"), 6) != a


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    classes = sorted(set(train_y))
    centroids = np.stack([train_x[np.array(train_y) == c].mean(0) for c in classes])
    d = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)
    pred = [classes[i] for i in d.argmin(1)]
    return float(np.mean([p == t for p, t in zip(pred, test_y, strict=True)]))


def test_learnable_but_not_trivial_and_tags_separate_siblings(dataset):
    """Colours alone and tags alone each carry signal well above chance; neither makes the task
    trivial; and on characters that have a look-alike sibling, tags do much better than colours:
    the text modality has something to add."""
    _, info, rows = dataset
    train, test = rows["train"], rows["val"] + rows["test"]
    cast = info.config["cast"]
    sibling_group = {c["name"] for c in cast if c["sibling_of"]} | {c["sibling_of"] for c in cast if c["sibling_of"]}

    def colours(r):  # a 64-bin colour histogram: hair, eyes and outfit are colours
        img = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB").resize((32, 32))) // 64
        h = np.bincount((img[..., 0] * 16 + img[..., 1] * 4 + img[..., 2]).ravel(), minlength=64)
        return np.sqrt(h / h.sum()).astype(np.float32)

    tag_index = {t: i for i, t in enumerate(info.tags)}

    def multihot(r):
        v = np.zeros(len(tag_index), dtype=np.float32)
        v[[tag_index[t] for t in r["tags"]]] = 1
        return v

    def accuracy(feature, subset):
        x = np.stack([feature(r) for r in train])
        return _nearest_centroid_accuracy(x, [r["character"] for r in train],
                                          np.stack([feature(r) for r in subset]), [r["character"] for r in subset])

    chance = max(Counter(r["character"] for r in test).values()) / len(test)
    siblings = [r for r in test if r["character"] in sibling_group]
    acc = {(f.__name__, name): accuracy(f, subset)
           for f in (colours, multihot) for name, subset in (("all", test), ("siblings", siblings))}
    print(f"majority {chance:.2f}; " + ", ".join(f"{k[0]}/{k[1]} {v:.2f}" for k, v in acc.items()))
    assert len(siblings) >= 20
    assert 2 * chance < acc["colours", "all"] < 0.9
    assert 2 * chance < acc["multihot", "all"] < 0.99
    assert acc["multihot", "siblings"] > acc["colours", "siblings"] + 0.3
