"""Curriculum learning over the text modality.

Training moves from "all given tags visible" to "often no tags at all", so one network works both
with the tags that came with an image and from the image alone. At each global step the schedule
gives two numbers:

- ``drop``: the probability that a sample's whole tag sequence is replaced by the "no text" input;
- ``mask``: the fraction of the remaining samples' individual tags removed (uploads arrive with
  partial tags).

Both follow the same curve: ``warmup`` (fraction of training) at zero, then a linear or cosine
``ramp`` to their maxima, then a cool-down at the maxima. ``none`` is the constant schedule (always
all text: the ablation), and ``constant`` holds the maxima from the first step (``max_drop=1`` is the
image-only model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model import defaults
from model.config import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID

KINDS = ("none", "constant", "linear", "cosine")


@dataclass
class CurriculumConfig:
    kind: str = defaults.CURRICULUM_KIND
    warmup: float = defaults.CURRICULUM_WARMUP  # fraction of training with all text
    ramp: float = defaults.CURRICULUM_RAMP  # fraction of training spent ramping up
    max_drop: float = defaults.CURRICULUM_MAX_DROP  # final probability of dropping the whole tag sequence
    max_mask: float = defaults.CURRICULUM_MAX_MASK  # final fraction of individual tags removed

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown curriculum {self.kind!r}; choose from {KINDS}")
        for name in ("warmup", "ramp", "max_drop", "max_mask"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"curriculum {name} must be in [0, 1]")


@dataclass(frozen=True)
class CurriculumState:
    drop: float
    mask: float


def schedule(cfg: CurriculumConfig, step: int, total_steps: int) -> CurriculumState:
    """The schedule's values at a global step (the same on every worker)."""
    if cfg.kind == "none":
        return CurriculumState(0.0, 0.0)
    if cfg.kind == "constant":
        return CurriculumState(cfg.max_drop, cfg.max_mask)
    progress = step / max(1, total_steps)
    t = (progress - cfg.warmup) / cfg.ramp if cfg.ramp > 0 else float(progress >= cfg.warmup)
    t = min(1.0, max(0.0, t))
    if cfg.kind == "cosine":
        t = 0.5 - 0.5 * math.cos(math.pi * t)
    return CurriculumState(cfg.max_drop * t, cfg.max_mask * t)


def phase_steps(cfg: CurriculumConfig, total_steps: int) -> dict[str, int]:
    """The global steps where the schedule's phases begin, for the plan line."""
    if cfg.kind in ("none", "constant"):
        return {}
    return {"text dropping from": int(cfg.warmup * total_steps),
            f"full drop {cfg.max_drop:.0%} from": int(min(1.0, cfg.warmup + cfg.ramp) * total_steps)}


def apply(tag_ids: torch.Tensor, state: CurriculumState, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one step's curriculum to a batch of tag sequences ``(B, T)`` laid out as
    ``[CLS] tags... [SEP] [PAD]...``. Dropped samples become the "no text" input; masked tags are
    removed (the sequence is re-packed so it stays ``[CLS] tags [SEP]``)."""
    if state.drop <= 0 and state.mask <= 0:
        return tag_ids
    b, t = tag_ids.shape
    u = torch.rand((b, t), generator=generator, device=tag_ids.device)
    is_tag = tag_ids >= UNK_ID  # tags proper (known or [UNK]); the rest is structure
    keep = ~is_tag | (u >= state.mask)
    # re-pack each row, kept tokens first in their order: a stable sort of the row by "dropped", no loop over
    # rows (on a GPU a boolean index per row would wait for the device once per sample)
    kept = keep & (tag_ids != PAD_ID)  # (B, T)
    packed = torch.gather(tag_ids, 1, torch.argsort((~kept).to(torch.uint8), dim=1, stable=True))
    slots = torch.arange(t, device=tag_ids.device)[None, :]
    out = torch.where(slots < kept.sum(1, keepdim=True), packed, torch.full_like(tag_ids, PAD_ID))
    dropped = torch.rand(b, generator=generator, device=tag_ids.device) < state.drop
    empty = (out >= UNK_ID).sum(1) == 0  # no tags left: that is "no text" too
    return torch.where((dropped | empty)[:, None], no_text(b, t, tag_ids.device), out)


def no_text(batch: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The "no text" input: ``[CLS] [MASK] [SEP]``, a normal sequence whose learned [MASK] embedding
    stands for "no tags given". The image-only case takes the same path as any other input."""
    seq = torch.full((batch, length), PAD_ID, dtype=torch.long, device=device)
    seq[:, 0], seq[:, 1], seq[:, 2] = CLS_ID, MASK_ID, SEP_ID
    return seq
