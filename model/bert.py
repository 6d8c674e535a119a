"""A BERT encoder in plain PyTorch, the tag encoder's body.

Its parameters have the names, shapes and initialisation of ``transformers.BertModel(config,
add_pooling_layer=False)`` (post-LayerNorm layers, exact GELU, LayerNorm eps 1e-12, weights drawn from
N(0, 0.02)), and its forward pass computes the same function, so checkpoints written with either load
into the other (``tests/unit/test_bert.py`` checks both against transformers). It exists because
importing ``transformers.BertModel`` costs about 0.8 s of CPU in every process that builds the network:
each Serve model replica, Ray Train worker and backfill predictor, on every start and restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-12  # BertConfig's default
INIT_STD = 0.02  # BertConfig.initializer_range


@dataclass(frozen=True)
class BertSettings:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    pad_id: int
    dropout: float = 0.0
    type_vocab_size: int = 1


class Embeddings(nn.Module):
    def __init__(self, s: BertSettings):
        super().__init__()
        self.word_embeddings = nn.Embedding(s.vocab_size, s.hidden_size, padding_idx=s.pad_id)
        self.position_embeddings = nn.Embedding(s.max_positions, s.hidden_size)
        self.token_type_embeddings = nn.Embedding(s.type_vocab_size, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.token_type_embeddings(torch.zeros_like(ids))
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, s: BertSettings):
        super().__init__()
        if s.hidden_size % s.num_heads:
            raise ValueError(f"the tag encoder's width {s.hidden_size} is not a multiple of its {s.num_heads} heads")
        self.heads = s.num_heads
        self.query = nn.Linear(s.hidden_size, s.hidden_size)
        self.key = nn.Linear(s.hidden_size, s.hidden_size)
        self.value = nn.Linear(s.hidden_size, s.hidden_size)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, D); ``keep`` (B, 1, 1, T) True where a key may be attended to."""
        b, t, d = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value), attn_mask=keep,
                                             dropout_p=self.dropout.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, t, d)


class DenseResidual(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual): BERT's ``BertSelfOutput`` and ``BertOutput``."""

    def __init__(self, s: BertSettings, width_in: int):
        super().__init__()
        self.dense = nn.Linear(width_in, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, s: BertSettings):
        super().__init__()
        self.self = SelfAttention(s)
        self.output = DenseResidual(s, s.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class Intermediate(nn.Module):
    def __init__(self, s: BertSettings):
        super().__init__()
        self.dense = nn.Linear(s.hidden_size, s.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, s: BertSettings):
        super().__init__()
        self.attention = Attention(s)
        self.intermediate = Intermediate(s)
        self.output = DenseResidual(s, s.intermediate_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, s: BertSettings):
        super().__init__()
        self.layer = nn.ModuleList([Layer(s) for _ in range(s.num_layers)])


class Bert(nn.Module):
    """``forward(ids, attention, positions)`` -> last hidden states ``(B, T, D)``; ``attention`` is 1 for
    tokens that may be attended to, 0 for padding."""

    def __init__(self, s: BertSettings):
        super().__init__()
        self.embeddings = Embeddings(s)
        self.encoder = Encoder(s)
        self.apply(_init)

    def forward(self, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        keep = attention.bool()[:, None, None, :]
        x = self.embeddings(ids, positions)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=INIT_STD)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
