"""Model behaviour: a short CPU training on a small synthetic Dan:mul drives the loss down and beats
chance by a wide margin; the exported checkpoint, used through ``Tagger`` on raw image bytes, gives
the same answers as the evaluation path (one preprocessing for every front end)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from ingest.shards import iter_examples, load_info
from ingest.storage import Storage
from ingest.synth import SynthConfig, synthesize
from model import train as training
from model.checkpoint import Labels, save
from model.network import DanmulNet
from model.tagger import Tagger
from model.vocab import TagVocab
from ray_jobs.local_data import batches, load_split
from ray_jobs.model_io import model_config_for
from ray_jobs.paper_claim import VARIANTS, FitConfig, fit

pytestmark = pytest.mark.slow


def test_short_training_learns_and_tagger_agrees(tmp_path):
    data = str(tmp_path / "data")
    synthesize(SynthConfig(out=data, characters=8, images=480, image_size=32, seed=1, workers=1), progress=False)
    info = load_info(Storage(data))
    train, test = load_split(data, "train", info), load_split(data, "test", info)
    val = load_split(data, "val", info)
    test.images += val.images
    test.tags += val.tags
    test.characters = np.concatenate([test.characters, val.characters])
    vocab, cfg = TagVocab(info.tags), model_config_for(info, image_size=32)
    torch.manual_seed(0)
    net = DanmulNet(cfg)
    history = fit(net, train, vocab, FitConfig(epochs=12, batch_size=32), VARIANTS["multimodal, curriculum"],
                  log=lambda s: None)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["text_drop"] > 0.5  # the curriculum ran

    metrics = training.evaluate(net, lambda: batches(test, vocab, cfg, 64))
    majority = max(Counter(test.characters.tolist()).values()) / len(test.characters)
    print(f"majority {majority:.2f}; {metrics}")
    assert metrics["image_only"]["top1"] >= max(0.5, 1.4 * majority)  # uniform chance is 0.125
    assert metrics["image_tags"]["top1"] >= metrics["image_only"]["top1"] - 0.05
    assert metrics["image_tags"]["top1"] >= 0.6

    # export, reload through Tagger, predict from raw bytes: same accuracy as the evaluation path
    labels = Labels(info.characters, info.tags)
    save(tmp_path / "ckpt", net, labels, metrics)
    tagger = Tagger.from_checkpoint(tmp_path / "ckpt")
    rows = [r for split in ("test", "val") for r in iter_examples(Storage(data), split)]
    preds = tagger.predict([r["image"] for r in rows])
    acc = np.mean([p.characters[0][0] == r["character"] for p, r in zip(preds, rows, strict=True)])
    assert acc == pytest.approx(metrics["image_only"]["top1"], abs=1e-9)
