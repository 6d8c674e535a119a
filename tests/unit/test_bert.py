"""The tag encoder's BERT (``model/bert.py``) against transformers' ``BertModel``, which it replaces: the
same parameter names and shapes (checkpoints load both ways), the same function, the same initialisation.
transformers is a test dependency only for this comparison."""

from __future__ import annotations

import pytest
import torch

from model.bert import INIT_STD, Bert, BertSettings
from model.config import PAD_ID

transformers = pytest.importorskip("transformers")

SETTINGS = BertSettings(vocab_size=50, hidden_size=24, num_layers=2, num_heads=3, intermediate_size=96,
                        max_positions=10, pad_id=PAD_ID, dropout=0.1)


def reference() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=SETTINGS.vocab_size, hidden_size=SETTINGS.hidden_size,
                                  num_hidden_layers=SETTINGS.num_layers, num_attention_heads=SETTINGS.num_heads,
                                  intermediate_size=SETTINGS.intermediate_size,
                                  max_position_embeddings=SETTINGS.max_positions, type_vocab_size=1,
                                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=PAD_ID)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, SETTINGS.vocab_size, (4, 7), generator=g)
    ids[1, 4:] = PAD_ID  # padded rows, as tag lists of different lengths are
    ids[3, 1:] = PAD_ID
    return ids, (ids != PAD_ID).long(), torch.zeros_like(ids)


def test_parameters_have_bertmodels_names_shapes_and_order():
    """Names and shapes load checkpoints; the order matters too: a resumed run's optimizer state lists its
    tensors in parameter order."""
    ours = [(k, tuple(v.shape)) for k, v in Bert(SETTINGS).state_dict().items()]
    theirs = [(k, tuple(v.shape)) for k, v in reference().state_dict().items()]
    assert ours == theirs
    assert [k for k, _ in Bert(SETTINGS).named_parameters()] == [k for k, _ in reference().named_parameters()]


@pytest.mark.parametrize("positions", ["zeros", "arange"])
def test_same_function_as_bertmodel_on_padded_batches_both_ways(positions):
    ids, attention, pos = batch()
    if positions == "arange":
        pos = torch.arange(ids.shape[1]).expand_as(ids)
    theirs, ours = reference().eval(), Bert(SETTINGS).eval()
    ours.load_state_dict(theirs.state_dict())  # a checkpoint written with transformers loads here
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=attention, position_ids=pos).last_hidden_state
        got = ours(ids, attention, pos)
    assert got.shape == expected.shape == (4, 7, SETTINGS.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the other way: ours, freshly initialised, into transformers
    fresh = Bert(SETTINGS).eval()
    theirs.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention, pos),
                                   theirs(input_ids=ids, attention_mask=attention, position_ids=pos).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_unpadded_tokens():
    ids, attention, pos = batch()
    net = Bert(SETTINGS).eval()
    with torch.no_grad():
        full = net(ids[1:2, :4], attention[1:2, :4], pos[1:2, :4])
        padded = net(ids[1:2], attention[1:2], pos[1:2])
    torch.testing.assert_close(padded[:, :4], full)


def test_initialisation_matches_bertmodels():
    torch.manual_seed(0)
    net = Bert(BertSettings(vocab_size=2000, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=256,
                            max_positions=34, pad_id=PAD_ID))
    words = net.embeddings.word_embeddings.weight
    assert torch.count_nonzero(words[PAD_ID]) == 0  # the padding token's row is zero
    assert words[PAD_ID + 1:].std().item() == pytest.approx(INIT_STD, rel=0.05)
    dense = net.encoder.layer[0].intermediate.dense
    assert dense.weight.std().item() == pytest.approx(INIT_STD, rel=0.05) and torch.count_nonzero(dense.bias) == 0
    norm = net.encoder.layer[0].output.LayerNorm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_dropout_is_active_only_in_training():
    ids, attention, pos = batch()
    net = Bert(SETTINGS)
    with torch.no_grad():
        net.train()
        a, b = net(ids, attention, pos), net(ids, attention, pos)
        net.eval()
        c, d = net(ids, attention, pos), net(ids, attention, pos)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, d)
