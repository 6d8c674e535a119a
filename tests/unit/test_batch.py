"""Rows -> model batch: one function for the Ray Data decode step and the in-memory loader."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.batch import encode, model_batch
from model.config import preset
from model.vocab import TagVocab
from ray_jobs.local_data import Split, batches
from ray_jobs.train_data import decode_batch

TAGS = ["red", "blue", "hat"]


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_row_without_image_keeps_its_place_and_is_dropped_and_counted_later():
    vocab = TagVocab(TAGS)
    arrays = encode([Image.new("RGB", (8, 8), (255, 0, 0)), None, Image.new("RGB", (8, 8), (0, 0, 255))],
                    [["red"], ["hat", "unknown"], []], [2, 0, 1], vocab, 16, [0.5] * 3, [0.5] * 3, 4)
    assert arrays["ok"].tolist() == [True, False, True]
    assert arrays["images"].shape == (3, 3, 16, 16) and not arrays["images"][1].any()
    assert arrays["tag_targets"].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    bad = [0]
    batch = model_batch(arrays, bad=bad)
    assert bad == [1]
    assert batch["characters"].tolist() == [2, 1] and batch["images"].shape == (2, 3, 16, 16)
    assert batch["tag_targets"].dtype == torch.float32 and set(batch) == {"images", "tag_ids", "tag_targets",
                                                                          "characters"}
    assert batch["images"][0, 0].mean().item() == pytest.approx(1.0)  # red, normalised with mean/std 0.5
    none = [0]
    assert model_batch(encode([None], [[]], [0], vocab, 16, [0.5] * 3, [0.5] * 3, 4), bad=none) is None
    assert none == [1]


def test_ray_data_and_in_memory_batches_are_the_same_tensors():
    cfg = preset("tiny", num_characters=2, num_tags=len(TAGS), image_size=16, max_tags=4)
    colours, tags, chars = [(255, 0, 0), (0, 128, 255)], [["red", "hat"], ["blue"]], ["a", "b"]
    rows = {"image": np.array([png(c) for c in colours], dtype=object), "tags": np.array(tags, dtype=object),
            "character": np.array(chars, dtype=object)}
    ray_batch = model_batch(decode_batch(rows, chars, TAGS, cfg.image_size, list(cfg.mean), list(cfg.std),
                                         cfg.max_tags, augment=False))
    split = Split([Image.open(io.BytesIO(png(c))).convert("RGB") for c in colours], tags, np.array([0, 1]),
                  np.array([1, 2]), 0)
    local = next(batches(split, TagVocab(TAGS), cfg, 8))
    assert set(ray_batch) == set(local)
    for key in local:
        assert torch.equal(ray_batch[key], local[key]), key
