"""The model replica's batch function, without Ray: what one dynamic batch of the streaming tagger does with
the ``Tagger`` (``deploy.replica.TaggerModel._score`` calls it), so ``danmul bench gpu`` can measure the same
code where Ray is not installed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Item:
    pixels: Any  # (3, S, S) tensor
    tags: list[str] | None
    top_k: int
    threshold: float | None


def score_batch(tagger, items: list[Item]) -> list[dict]:
    """One batch of preprocessed images -> each item's answer (``Prediction.to_dict`` and the batch size)."""
    import torch

    pixels = torch.stack([i.pixels for i in items])  # (B, 3, S, S)
    chars, tag_probs = tagger.scores(pixels, [i.tags for i in items])
    known = tagger.vocab.knows_any
    return [{**tagger.decode(c, t, item.top_k, item.threshold, with_tags=known(item.tags)).to_dict(),
             "batch_size": len(items)}
            for item, c, t in zip(items, chars, tag_probs, strict=True)]
