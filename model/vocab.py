"""The tag-level vocabulary of the text modality: each Danbooru tag is one token.

Token ids 0-4 are ``[PAD] [CLS] [SEP] [MASK] [UNK]``; tag ``i`` of ``dataset.json``'s ``tags`` list
is token ``i + 5``. A sequence is ``[CLS] tag tag ... [SEP]`` padded with ``[PAD]``; unknown tags map to
``[UNK]``; tags are a set, so they are ordered by id (most frequent first) and the sequence is
truncated to ``max_tags``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from model.config import CLS_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID


class TagVocab:
    def __init__(self, tags: Sequence[str]):
        self.tags = list(tags)
        self._ids = {t: i + len(SPECIAL_TOKENS) for i, t in enumerate(self.tags)}

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def size(self) -> int:
        """Token count including the special tokens."""
        return len(self.tags) + len(SPECIAL_TOKENS)

    def knows_any(self, tags: Iterable[str] | None) -> bool:
        """Whether any of ``tags`` is in the vocabulary (else the model sees only [UNK]s: no text)."""
        return bool(tags) and any(t in self._ids for t in tags)

    def token_id(self, tag: str) -> int:
        return self._ids.get(tag, UNK_ID)

    def encode(self, tags: Iterable[str], max_tags: int) -> list[int]:
        """``[CLS] ids... [SEP]`` (no padding); duplicates and blanks dropped, known tags first by id,
        then one ``[UNK]`` per unknown tag, truncated to ``max_tags`` tag tokens."""
        ids = sorted({self.token_id(t) for t in tags if t and t.strip()} - {UNK_ID})
        unknown = sum(1 for t in set(tags) if t and t.strip() and t not in self._ids)
        ids = (ids + [UNK_ID] * unknown)[:max_tags]
        return [CLS_ID, *ids, SEP_ID]

    def batch(self, tag_lists: Sequence[Iterable[str] | None], max_tags: int) -> torch.Tensor:
        """A padded ``(B, max_tags + 2)`` long tensor. ``None`` or no tags -> the "no text" input."""
        from model.curriculum import no_text

        length = max_tags + 2
        out = no_text(len(tag_lists), length)
        for i, tags in enumerate(tag_lists):
            if tags:
                seq = self.encode(tags, max_tags)
                if len(seq) > 2:
                    out[i] = PAD_ID
                    out[i, : len(seq)] = torch.tensor(seq)
        return out

    def multi_hot(self, tag_lists: Sequence[Iterable[str]]) -> torch.Tensor:
        """Targets for the tag head: ``(B, num_tags)`` floats; unknown tags are ignored."""
        out = torch.zeros(len(tag_lists), len(self.tags))
        for i, tags in enumerate(tag_lists):
            idx = [self._ids[t] - len(SPECIAL_TOKENS) for t in tags if t in self._ids]
            out[i, idx] = 1.0
        return out
