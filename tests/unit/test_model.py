"""The network, curriculum, vocabulary, losses and metrics, on tiny CPU configurations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import curriculum as cur
from model.config import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, ModelConfig, preset
from model.losses import LossConfig, asymmetric_loss, total_loss
from model.metrics import average_precision, character_thresholds, f1_at_balance, tag_map, topk_accuracy
from model.network import DanmulNet, load_pretrained_image_weights
from model.vocab import TagVocab

TAGS = [f"tag_{i}" for i in range(30)]


@pytest.fixture
def cfg() -> ModelConfig:
    return preset("tiny", num_characters=7, num_tags=len(TAGS), image_size=32, max_tags=8)


def make_batch(cfg: ModelConfig, with_tags: bool, b: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    vocab = TagVocab(TAGS)
    tag_lists = [[f"tag_{(i * 3 + j) % 30}" for j in range(5)] if with_tags else None for i in range(b)]
    return {
        "images": torch.randn(b, 3, cfg.image_size, cfg.image_size),
        "tag_ids": vocab.batch(tag_lists, cfg.max_tags),
        "characters": torch.arange(b) % cfg.num_characters,
        "tag_targets": vocab.multi_hot([t or ["tag_1"] for t in tag_lists]),
    }


def test_output_shapes_and_finite(cfg):
    net = DanmulNet(cfg)
    for with_tags in (False, True):
        out = net(make_batch(cfg, with_tags)["images"], make_batch(cfg, with_tags)["tag_ids"])
        assert out["characters"].shape == (4, 7) and out["tags"].shape == (4, 30)
        assert torch.isfinite(out["characters"]).all() and torch.isfinite(out["tags"]).all()


@pytest.mark.parametrize("with_tags", [False, True])
def test_every_parameter_gets_a_gradient(cfg, with_tags):
    net = DanmulNet(cfg)
    batch = make_batch(cfg, with_tags)
    loss, _ = total_loss(net(batch["images"], batch["tag_ids"]), batch["characters"], batch["tag_targets"],
                         LossConfig())
    loss.backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_tags_are_a_set_not_a_sequence(cfg):
    net = DanmulNet(cfg).eval()
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    a = torch.tensor([[CLS_ID, 9, 12, 20, SEP_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
    b = torch.tensor([[CLS_ID, 20, 9, 12, SEP_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
    with torch.no_grad():
        assert torch.allclose(net(images, a)["characters"], net(images, b)["characters"], atol=1e-5)
        # and tags do change the answer
        assert not torch.allclose(net(images, a)["characters"],
                                  net(images, cur.no_text(1, 10))["characters"], atol=1e-4)


def test_presets_build_and_base_matches_the_paper():
    base = preset("base")
    assert (base.image_model, base.image_size, base.num_characters) == ("vit_base_patch16_224", 224, 14413)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    assert ModelConfig.from_dict(base.to_dict()) == base


def test_pretrained_image_weights(cfg, tmp_path):
    donor, net = DanmulNet(cfg), DanmulNet(cfg)
    state = donor.image_encoder.vit.state_dict()
    load_pretrained_image_weights(net, state)
    for k, v in net.image_encoder.vit.state_dict().items():
        assert torch.equal(v, state[k])
    other = DanmulNet(preset("tiny", num_characters=7, num_tags=30, image_size=32, image_dim=48, image_heads=2))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained_image_weights(net, other.image_encoder.vit.state_dict())
    with pytest.raises(ValueError, match="missing"):
        load_pretrained_image_weights(net, {k: v for k, v in state.items() if "blocks.0." not in k})


# -- curriculum ---------------------------------------------------------------------------------------


def test_schedule_values_at_known_steps():
    c = cur.CurriculumConfig(kind="linear", warmup=0.1, ramp=0.5, max_drop=0.8, max_mask=0.4)
    assert cur.schedule(c, 0, 100) == cur.CurriculumState(0.0, 0.0)
    assert cur.schedule(c, 10, 100) == cur.CurriculumState(0.0, 0.0)  # end of warm-up
    s = cur.schedule(c, 35, 100)  # halfway up the ramp
    assert s.drop == pytest.approx(0.4) and s.mask == pytest.approx(0.2)
    assert cur.schedule(c, 60, 100) == cur.CurriculumState(0.8, 0.4)  # cool-down at the maximum
    assert cur.schedule(c, 99, 100) == cur.CurriculumState(0.8, 0.4)
    cos = cur.CurriculumConfig(kind="cosine", warmup=0.0, ramp=1.0, max_drop=1.0, max_mask=0.0)
    assert cur.schedule(cos, 25, 100).drop == pytest.approx(0.5 - 0.5 * np.cos(np.pi / 4))
    assert cur.schedule(cos, 50, 100).drop == pytest.approx(0.5)
    assert cur.schedule(cur.CurriculumConfig(kind="none"), 50, 100) == cur.CurriculumState(0.0, 0.0)
    const = cur.CurriculumConfig(kind="constant", max_drop=1.0, max_mask=0.0)
    assert cur.schedule(const, 0, 100) == cur.CurriculumState(1.0, 0.0)
    with pytest.raises(ValueError):
        cur.CurriculumConfig(kind="exponential")


def test_apply_drops_and_masks():
    vocab = TagVocab(TAGS)
    tag_ids = vocab.batch([[f"tag_{j}" for j in range(8)]] * 400, max_tags=8)  # 8 tags each
    g = torch.Generator().manual_seed(0)
    assert torch.equal(cur.apply(tag_ids, cur.CurriculumState(0, 0), g), tag_ids)
    assert torch.equal(cur.apply(tag_ids, cur.CurriculumState(1.0, 0), g), cur.no_text(400, 10))
    assert torch.equal(cur.apply(tag_ids, cur.CurriculumState(0, 1.0), g), cur.no_text(400, 10))
    out = cur.apply(tag_ids, cur.CurriculumState(0.25, 0.5), g)
    dropped = (out[:, 1] == MASK_ID)
    assert 0.18 < dropped.float().mean() < 0.35
    kept = out[~dropped]
    n_tags = (kept >= UNK_ID).sum(1).float()
    assert 3.0 < n_tags.mean() < 5.0  # about half of 8
    # sequences stay well formed: [CLS] tags [SEP] then padding
    for row in kept:
        n = int((row != PAD_ID).sum())
        assert row[0] == CLS_ID and row[n - 1] == SEP_ID and (row[n:] == PAD_ID).all()


def test_masking_keeps_the_remaining_tags_in_order_as_a_loop_over_rows_would():
    """The re-pack is vectorised (no per-row boolean index: on a GPU each would wait for the device): every row
    is what taking its kept tokens in order gives."""
    g = torch.Generator().manual_seed(3)
    tag_ids = torch.randint(UNK_ID, 300, (64, 20), generator=g)
    lengths = torch.randint(0, 18, (64,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tag_ids[i, 0], tag_ids[i, n + 1], tag_ids[i, n + 2 :] = CLS_ID, SEP_ID, PAD_ID
    out = cur.apply(tag_ids, cur.CurriculumState(0.0, 0.5), torch.Generator().manual_seed(7))
    u = torch.rand(tag_ids.shape, generator=torch.Generator().manual_seed(7))
    keep = (tag_ids < UNK_ID) | (u >= 0.5)
    for i in range(64):
        row = tag_ids[i][keep[i] & (tag_ids[i] != PAD_ID)]
        if (row >= UNK_ID).any():  # else the sample became "no text"
            assert torch.equal(out[i, : len(row)], row) and (out[i, len(row) :] == PAD_ID).all()
        else:
            assert torch.equal(out[i], cur.no_text(1, 20)[0])


# -- vocabulary ---------------------------------------------------------------------------------------


def test_vocab_encoding():
    vocab = TagVocab(["a", "b", "c"])
    assert vocab.encode(["c", "a", "a", "zzz", " "], max_tags=8) == [CLS_ID, 5, 7, UNK_ID, SEP_ID]
    assert vocab.encode(["a", "b", "c"], max_tags=2) == [CLS_ID, 5, 6, SEP_ID]
    batch = vocab.batch([["b"], None, []], max_tags=3)
    assert batch.tolist()[0] == [CLS_ID, 6, SEP_ID, PAD_ID, PAD_ID]
    assert torch.equal(batch[1:], cur.no_text(2, 5))
    assert vocab.multi_hot([["a", "c", "nope"]]).tolist() == [[1.0, 0.0, 1.0]]


# -- losses and metrics -------------------------------------------------------------------------------


def test_asymmetric_loss_reduces_to_bce_without_focusing():
    logits, targets = torch.randn(6, 5), (torch.rand(6, 5) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()
    assert asymmetric_loss(logits, targets, gamma_neg=0, gamma_pos=0, clip=0) == pytest.approx(bce.item(), rel=1e-5)
    # focusing down-weights easy negatives
    assert asymmetric_loss(logits, targets) < bce


def test_metrics_on_known_values():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 2])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(1.0)
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    targets = np.array([[1, 0], [0, 0], [1, 0]])  # tag 1 has no support: excluded from mAP
    assert tag_map(np.array([[0.9, 0.1], [0.2, 0.5], [0.8, 0.3]]), targets) == pytest.approx(1.0)
    f1, t = f1_at_balance(np.array([[0.9, 0.6], [0.7, 0.2]]), np.array([[1, 0], [0, 1]]))
    assert (f1, t) == (0.5, 0.7)  # 2 positives -> the top-2 scores; one of them right


def test_character_thresholds_reach_target_precision():
    rng = np.random.default_rng(0)
    n, c = 2000, 4
    labels = rng.integers(0, c, n)
    conf = rng.uniform(0.3, 1.0, n)
    correct = rng.random(n) < conf  # confident predictions are right more often
    pred = np.where(correct, labels, (labels + 1) % c)
    probs = np.full((n, c), 0.0)
    probs[np.arange(n), pred] = conf
    thresholds = character_thresholds(probs, labels, target_precision=0.9)
    for k in range(c):
        sel = (pred == k) & (conf >= thresholds[k])
        assert sel.sum() > 50
        assert (pred[sel] == labels[sel]).mean() >= 0.9
    assert (character_thresholds(probs, labels, target_precision=1.01) == 1.0).all()  # unreachable: abstain


def test_pretrained_weights_from_a_file_and_clear_errors(cfg, tmp_path):
    from safetensors.torch import save_file

    from ray_jobs.model_io import build_net

    donor = DanmulNet(cfg)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in donor.image_encoder.vit.state_dict().items()}, str(path))
    net = build_net(preset("tiny", num_characters=7, num_tags=len(TAGS), image_size=32, max_tags=8,
                           pretrained_image=str(path)))
    for k, v in net.image_encoder.vit.state_dict().items():
        assert torch.equal(v, donor.image_encoder.vit.state_dict()[k])
    pickled = tmp_path / "vit.pth"
    torch.save(donor.image_encoder.vit.state_dict(), pickled)
    with pytest.raises(ValueError, match="safetensors"):
        build_net(preset("tiny", num_characters=7, num_tags=len(TAGS), image_size=32, pretrained_image=str(pickled)))
    with pytest.raises(FileNotFoundError):
        build_net(preset("tiny", num_characters=7, num_tags=len(TAGS), pretrained_image=str(tmp_path / "none")))
