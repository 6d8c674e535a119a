"""Training losses: cross-entropy for the character (label smoothing optional), and BCE or the
asymmetric loss (Ridnik et al., 2021) for multi-label tags, where negatives vastly outnumber
positives (a 10,000-tag vocabulary, about 24 positives per image)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    tag_loss: str = "asl"  # "bce" or "asl"
    tag_weight: float = 1.0  # weight of the tag loss against the character loss
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Mean over the batch of the per-image summed asymmetric loss, ``(B, K)`` logits and targets.
    Easy negatives are down-weighted by ``p ** gamma_neg`` and shifted by ``clip``."""
    p = torch.sigmoid(logits.float())
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = targets * (1 - p).pow(gamma_pos) * torch.log(p.clamp(min=eps))
    loss_neg = (1 - targets) * p_neg.pow(gamma_neg) * torch.log((1 - p_neg).clamp(min=eps))
    return -(loss_pos + loss_neg).sum(1).mean()


def tag_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    if cfg.tag_loss == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").sum(1).mean()
    if cfg.tag_loss == "asl":
        return asymmetric_loss(logits, targets, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip)
    raise ValueError(f"unknown tag loss {cfg.tag_loss!r}; use 'bce' or 'asl'")


def total_loss(outputs: dict[str, torch.Tensor], characters: torch.Tensor, tags: torch.Tensor,
               cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The training objective and its parts (for logging)."""
    ce = F.cross_entropy(outputs["characters"].float(), characters, label_smoothing=cfg.label_smoothing)
    tl = tag_loss(outputs["tags"], tags, cfg)
    loss = ce + cfg.tag_weight * tl
    return loss, {"loss": loss.item(), "character_loss": ce.item(), "tag_loss": tl.item()}
