"""Checkpoint round trip (safetensors, no pickle) and the Tagger predictor."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ingest.storage import Storage
from model.checkpoint import Labels, load, save
from model.config import preset
from model.network import DanmulNet
from model.preprocess import ImageError
from model.tagger import Tagger

CHARS = [f"char_{i}" for i in range(6)]
TAGS = [f"tag_{i}" for i in range(20)]


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def ckpt_dir(tmp_path):
    torch.manual_seed(0)
    net = DanmulNet(preset("tiny", num_characters=len(CHARS), num_tags=len(TAGS), image_size=32, max_tags=8))
    version = save(tmp_path / "ckpt", net, Labels(CHARS, TAGS), {"image_only": {"top1": 0.5}})
    return tmp_path / "ckpt", net, version


def test_round_trip_gives_identical_outputs(ckpt_dir):
    path, net, version = ckpt_dir
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "labels.json", "metrics.json", "model.safetensors"]
    ck = load(path)
    assert ck.version == version and len(version) == 12
    assert ck.metrics == {"image_only": {"top1": 0.5}} and ck.labels.characters == CHARS
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([[1, 7, 2, 0, 0, 0, 0, 0, 0, 0]] * 2)
    net.eval()
    with torch.no_grad():
        a, b = net(x, t), ck.net(x, t)
    assert torch.equal(a["characters"], b["characters"]) and torch.equal(a["tags"], b["tags"])
    # the same weights give the same version; the config alone rebuilds the architecture
    assert save(path.parent / "again", ck.net, ck.labels) == version
    assert json.loads((path / "config.json").read_text())["model"]["image_size"] == 32


def test_tampered_weights_are_refused(ckpt_dir):
    path, _, _ = ckpt_dir
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match"):
        load(path)


def test_loads_through_object_storage_interface(ckpt_dir, tmp_path):
    path, _, version = ckpt_dir
    store = Storage(str(tmp_path / "bucket-like"))
    for f in path.iterdir():
        store.write_bytes(f"models/v1/{f.name}", f.read_bytes())
    assert Tagger.from_checkpoint(store.child("models/v1")).version == version
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "nowhere"))


def test_tagger_predicts_ranked_characters_and_tags(ckpt_dir):
    path, _, version = ckpt_dir
    tagger = Tagger.from_checkpoint(path)
    images = [jpeg((200, 10, 10)), jpeg((10, 10, 200)), Image.new("RGBA", (20, 50), (0, 0, 0, 0))]
    preds = tagger.predict(images, tags=[["tag_1", "tag_2"], None, []], top_k=3)
    assert len(preds) == 3
    for p in preds:
        assert p.model == version and len(p.characters) == 3 and not p.abstained
        scores = [s for _, s in p.characters]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert {n for n, _ in p.characters} <= set(CHARS)
        assert all(s >= 0.35 for s in p.tags.values())  # default tag threshold
    # the tags given change the prediction; no tags and an empty list are the same input
    with_tags = tagger.predict([images[0]], tags=[["tag_1", "tag_2"]])[0]
    without = tagger.predict([images[0]])[0]
    assert with_tags.characters != without.characters
    assert tagger.predict([images[0]], tags=[[]])[0].characters == without.characters
    # batching does not change results
    tagger.batch_size = 1
    one_by_one = [tagger.predict([im])[0].characters for im in images[:2]]
    tagger.batch_size = 64
    batched = [p.characters for p in tagger.predict(images[:2])]
    for a, b in zip(one_by_one, batched, strict=True):
        assert [n for n, _ in a] == [n for n, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)


def test_thresholds_abstain_and_filter(ckpt_dir):
    path, _, _ = ckpt_dir
    tagger = Tagger.from_checkpoint(path)
    tagger.set_thresholds(tag_threshold=1.01, character_threshold=1.01)
    p = tagger.predict([jpeg((0, 255, 0))])[0]
    assert p.abstained and p.characters == [] and p.tags == {} and p.best_character[0] in CHARS
    tagger.set_thresholds(tag_threshold=0.0, character_threshold=0.0)
    p = tagger.predict([jpeg((0, 255, 0))])[0]
    assert not p.abstained and len(p.tags) == len(TAGS)
    assert list(p.tags.values()) == sorted(p.tags.values(), reverse=True)
    assert p.to_dict()["characters"][0][0] == p.characters[0][0]


def test_bad_image_is_a_clear_error(ckpt_dir):
    tagger = Tagger.from_checkpoint(ckpt_dir[0])
    with pytest.raises(ImageError):
        tagger.predict([b"not an image"])
    assert tagger.predict([]) == []


def test_train_state_round_trip_resumes_identically(tmp_path):
    """Optimizer state saved without pickle; two more steps after a restore match two more steps
    without one."""
    from model.checkpoint import load_train_state, save_train_state

    def step(net, opt, seed):
        torch.manual_seed(seed)
        x = torch.randn(3, 3, 32, 32)
        loss = net(x, torch.tensor([[1, 9, 2, 0, 0, 0, 0, 0, 0, 0]] * 3))["characters"].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    cfg = preset("tiny", num_characters=len(CHARS), num_tags=len(TAGS), image_size=32, max_tags=8)
    torch.manual_seed(0)
    net = DanmulNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step(net, opt, 1)
    save(tmp_path / "c", net, Labels(CHARS, TAGS))
    save_train_state(tmp_path / "c", opt, {"epoch": 1, "global_step": 1})
    step(net, opt, 2)
    expected = {k: v.clone() for k, v in net.state_dict().items()}

    restored = load(tmp_path / "c").net.train()
    opt2 = torch.optim.AdamW(restored.parameters(), lr=1e-3)
    assert load_train_state(tmp_path / "c", opt2) == {"epoch": 1, "global_step": 1}
    step(restored, opt2, 2)
    for k, v in restored.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k


def test_uploads_with_tags_are_held_to_their_own_calibrated_thresholds(tmp_path):
    torch.manual_seed(0)
    net = DanmulNet(preset("tiny", num_characters=len(CHARS), num_tags=len(TAGS), image_size=32, max_tags=8))
    never, always = [1.01] * len(CHARS), [0.0] * len(CHARS)
    save(tmp_path / "ckpt", net, Labels(CHARS, TAGS, never, [0.5] * len(TAGS), 0.9, always))
    tagger = Tagger.from_checkpoint(tmp_path / "ckpt")
    image_only, tagged, empty, unknown = tagger.predict([jpeg((0, 255, 0))] * 4,
                                                       tags=[None, ["tag_3", "zzz"], [], ["zzz", "yyy"]])
    assert image_only.abstained and image_only.characters == []  # image-only: the image-only bar (never)
    assert not tagged.abstained and len(tagged.characters) == 5  # with tags: its own bar (always); top 5
    assert empty.abstained  # an empty tag list is no tags
    assert unknown.abstained  # tags the vocabulary does not know reach the model as no text: image-only bar
    tagger.set_thresholds(character_threshold=0.0)  # an operator's override replaces both
    assert not tagger.predict([jpeg((0, 255, 0))])[0].abstained


def test_labels_without_thresholds_for_tags_use_the_image_only_ones(tmp_path):
    labels = Labels(CHARS, TAGS, [0.3] * len(CHARS))
    assert labels.character_thresholds_with_tags == [0.3] * len(CHARS)  # checkpoints from before the field
    with pytest.raises(ValueError, match="character_thresholds_with_tags"):
        Labels(CHARS, TAGS, character_thresholds_with_tags=[0.1])


@pytest.mark.parametrize("edit, field", [
    ({"character_thresholds": [float("nan")] * 6}, "character_thresholds"),
    ({"character_thresholds": [1.02] * 6}, "character_thresholds"),
    ({"character_thresholds_with_tags": [-0.1] * 6}, "character_thresholds_with_tags"),
    ({"tag_thresholds": ["0.5"] * 20}, "tag_thresholds"),
    ({"tag_thresholds": [True] * 20}, "tag_thresholds"),
    ({"tag_thresholds": {"tag_0": 0.5}}, "tag_thresholds"),
    ({"abstain_precision": float("inf")}, "abstain_precision"),
    ({"characters": [*CHARS[:5], CHARS[0]]}, "characters"),
    ({"tags": [*TAGS[:19], ""]}, "tags"),
    ({"characters": None}, "characters"),
    ({"character_thresholds": [0.1] * 5}, "character_thresholds"),
])
def test_a_hand_edited_labels_file_fails_at_load_naming_the_field(ckpt_dir, edit, field):
    path, _, _ = ckpt_dir
    labels = json.loads((path / "labels.json").read_text())
    (path / "labels.json").write_text(json.dumps({**labels, **edit}))  # json writes NaN/Infinity as tokens
    with pytest.raises(ValueError, match=f"labels.json: {field}"):
        load(path)


@pytest.mark.parametrize("text, message", [
    ("not json", "not JSON"), ("[1, 2]", "JSON object"), ('{"tags": []}', "missing characters"),
    ("\udcff", "not JSON"),
])
def test_a_labels_file_that_is_no_object_fails_at_load(ckpt_dir, text, message):
    path, _, _ = ckpt_dir
    (path / "labels.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=message):
        load(path)


def test_fields_a_newer_writer_adds_to_labels_are_ignored(ckpt_dir):
    path, _, _ = ckpt_dir
    labels = json.loads((path / "labels.json").read_text())
    (path / "labels.json").write_text(json.dumps({**labels, "registry": {"new_char": [0.1, 0.2]}}))
    assert load(path).labels.characters == CHARS


# -- throughput settings (what a GPU wants; the CPU's answers stay the same) ------------------------------------
def test_the_batch_size_defaults_per_preset_and_device(ckpt_dir):
    from model.config import default_batch_size

    assert Tagger.from_checkpoint(ckpt_dir[0]).batch_size == 64  # CPU: unchanged
    assert default_batch_size(preset("base"), "cuda") == 256 and default_batch_size(preset("base"), "cpu") == 64
    assert default_batch_size(preset("base", image_size=448), "cuda") == 64  # 4x the tokens, a quarter the batch
    assert default_batch_size(preset("tiny"), "cuda") == 1024
    assert default_batch_size(preset("base", image_model="vit_small_patch16_224"), "cuda") == 64  # no preset's


def test_channels_last_and_a_compiled_padded_batch_give_the_same_scores(ckpt_dir, monkeypatch):
    path = ckpt_dir[0]
    x = torch.randn(3, 3, 32, 32)
    tags = [["tag_1"], None, ["tag_2", "nope"]]
    eager = Tagger.from_checkpoint(path, batch_size=8)
    want = eager.scores(x, tags)
    last = Tagger.from_checkpoint(path, batch_size=8, channels_last=True)
    for a, b in zip(last.scores(x, tags), want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: lambda p, t: seen.append(p.shape[0]) or net(p, t))
    compiled = Tagger.from_checkpoint(path, batch_size=8, compile=True)
    compiled.warm_up()
    got = compiled.scores(x, tags)
    assert seen == [8, 8]  # the short batch was padded: one batch size, one compiled graph
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_batches_in_flight_give_what_one_batch_at_a_time_gives(ckpt_dir):
    tagger = Tagger.from_checkpoint(ckpt_dir[0], batch_size=4)
    x = torch.randn(10, 3, 32, 32)
    tags = [["tag_3"] if i % 2 else None for i in range(10)]
    pending = tagger.scores_async(x[:4], tags[:4])
    for got, want in zip(pending.result(), tagger.scores(x[:4], tags[:4]), strict=True):
        np.testing.assert_array_equal(got, want)
    whole = tagger.predict_tensors(x, tags, top_k=3)
    one_by_one = [p for i in range(10) for p in Tagger.from_checkpoint(ckpt_dir[0], batch_size=1).predict_tensors(
        x[i : i + 1], tags[i : i + 1], top_k=3)]
    for a, b in zip(whole, one_by_one, strict=True):  # the same, up to float rounding of other batch shapes
        assert [n for n, _ in a.characters] == [n for n, _ in b.characters] and a.tags.keys() == b.tags.keys()
        np.testing.assert_allclose([s for _, s in a.characters], [s for _, s in b.characters], atol=1e-5)


def test_the_top_k_are_the_k_best_best_first(ckpt_dir):
    tagger = Tagger.from_checkpoint(ckpt_dir[0])
    probs = np.random.default_rng(0).dirichlet(np.ones(len(CHARS))).astype(np.float32)
    pred = tagger.decode(probs, np.zeros(len(TAGS), np.float32), top_k=4)
    assert [n for n, _ in pred.characters] == [CHARS[i] for i in np.argsort(-probs)[:4]]
    assert len(tagger.decode(probs, np.zeros(len(TAGS), np.float32), top_k=50).characters) == len(CHARS)
