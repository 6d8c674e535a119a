"""Training steps, the pass over a split, and evaluation, in plain PyTorch.

Front ends feed batches: the Ray Train worker (``ray_jobs/train.py``), the single-process paper benchmark
(``ray_jobs/paper_claim.py``) and the training benchmark all run :func:`train_pass` (which calls
:func:`train_step`) and :func:`evaluate`, so the distributed run trains the same way as the local one.
A batch is a dict of tensors:

    images      (B, 3, S, S) float, preprocessed
    tag_ids     (B, T) long, the tags that came with each image ([CLS] tags [SEP] [PAD]...)
    characters  (B,) long, class ids
    tag_targets (B, K) float 0/1, the tags to predict
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from model import curriculum as cur
from model.losses import LossConfig, total_loss
from model.metrics import answered_at_thresholds, character_thresholds, f1_at_balance, tag_map, topk_accuracy


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of steps with a linear LR warm-up, then cosine decay
    grad_clip: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)


def make_optimizer(net: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (1-D tensors and embedding tables)."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "modality" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    warm = max(1, int(cfg.warmup * total_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total_steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    step: int,
    total_steps: int,
    optim: OptimConfig,
    curriculum: cur.CurriculumConfig,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One optimizer step at global ``step``; returns the logged values (losses, lr, curriculum)."""
    state = cur.schedule(curriculum, step, total_steps)
    tag_ids = cur.apply(batch["tag_ids"], state, generator)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total_steps, optim)
    net.train()
    device = batch["images"].device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = net(batch["images"], tag_ids)
    loss, logs = total_loss(out, batch["characters"], batch["tag_targets"], optim.loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), optim.grad_clip)
    optimizer.step()
    logs.update(lr=optimizer.param_groups[0]["lr"], text_drop=state.drop, tag_mask=state.mask)
    return logs


@dataclass
class PassResult:
    step: int  # the global step after the pass
    losses: list[float]
    samples: int
    logs: dict[str, float]  # the last step's


def train_pass(net: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[dict[str, torch.Tensor]],
               step: int, total_steps: int, optim: OptimConfig, curriculum: cur.CurriculumConfig,
               generator: torch.Generator | None = None, autocast_dtype: torch.dtype | None = None,
               agree: Callable[[bool], bool] | None = None,
               on_step: Callable[[int, dict[str, float]], None] | None = None,
               until: int | None = None) -> PassResult:
    """Steps over ``batches`` from global ``step`` until they run out or ``until`` (default
    ``total_steps``, the length the schedules are defined over) is reached.

    ``agree(has_batch)`` lets data-parallel workers decide together whether to take the next step (all
    or none: DDP hangs otherwise); ``on_step(step, logs)`` runs after each step (gauges, fault hooks).
    What is left in ``batches`` stays for the caller to drain or drop."""
    result = PassResult(step, [], 0, {})
    limit = total_steps if until is None else until
    while result.step < limit:
        batch = next(batches, None)
        if not (agree(batch is not None) if agree else batch is not None):
            break
        result.logs = train_step(net, optimizer, batch, result.step, total_steps, optim, curriculum, generator,
                                 autocast_dtype)
        result.losses.append(result.logs["loss"])
        result.samples += len(batch["characters"])
        result.step += 1
        if on_step:
            on_step(result.step, result.logs)
    return result


@torch.inference_mode()
def collect(net: nn.Module, batches: Iterable[dict[str, torch.Tensor]], image_only: bool,
            autocast_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Probabilities over a dataset: character softmax, tag sigmoid, and the labels."""
    net.eval()
    chars, tags, labels, targets = [], [], [], []
    for batch in batches:
        tag_ids = batch["tag_ids"]
        if image_only:
            tag_ids = cur.no_text(tag_ids.shape[0], tag_ids.shape[1], tag_ids.device)
        device = batch["images"].device
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = net(batch["images"], tag_ids)
        chars.append(torch.softmax(out["characters"].float(), -1).cpu().numpy())
        tags.append(torch.sigmoid(out["tags"].float()).cpu().numpy())
        labels.append(batch["characters"].cpu().numpy())
        targets.append(batch["tag_targets"].cpu().numpy())
    return {
        "characters": np.concatenate(chars), "tags": np.concatenate(tags),
        "labels": np.concatenate(labels), "targets": np.concatenate(targets),
    }  # fmt: skip


def summarize(scores: dict[str, np.ndarray], thresholds: list[float] | None = None) -> dict[str, float]:
    """Top-1/5, tag mAP and F1; with per-character ``thresholds``, also the share of images answered
    (``coverage``) and the precision of those answers."""
    f1, threshold = f1_at_balance(scores["tags"], scores["targets"])
    answered = {}
    if thresholds is not None:
        coverage, precision = answered_at_thresholds(scores["characters"], scores["labels"], np.asarray(thresholds))
        answered = {"coverage": coverage, "precision": precision}
    return {
        "top1": topk_accuracy(scores["characters"], scores["labels"], 1),
        "top5": topk_accuracy(scores["characters"], scores["labels"], 5),
        "tag_map": tag_map(scores["tags"], scores["targets"]),
        "tag_f1": f1,
        "tag_threshold": threshold,
        "images": len(scores["labels"]),
        **answered,
    }


def evaluate(net: nn.Module, batches_fn, autocast_dtype: torch.dtype | None = None,
             thresholds: list[float] | None = None,
             thresholds_with_tags: list[float] | None = None) -> dict[str, dict[str, float]]:
    """Metrics image-only and image+tags. ``batches_fn()`` returns a fresh iterable of batches; with
    per-character abstention ``thresholds`` (and ``thresholds_with_tags`` for the image+tags pass, else
    the same), coverage and precision too."""
    return {
        "image_only": summarize(collect(net, batches_fn(), True, autocast_dtype), thresholds),
        "image_tags": summarize(collect(net, batches_fn(), False, autocast_dtype),
                                thresholds_with_tags if thresholds_with_tags is not None else thresholds),
    }


@dataclass
class Calibration:
    character: list[float]  # per-character abstention thresholds, image-only uploads
    character_with_tags: list[float]  # the same for uploads that came with tags
    tags: list[float]  # one threshold per tag


def calibrate(net: nn.Module, batches_fn, target_precision: float = 0.9,
              autocast_dtype: torch.dtype | None = None) -> Calibration:
    """Thresholds from a held-out split: per-character abstention thresholds at ``target_precision``,
    image-only and with the tags that came with each image (the model is surer with them, and an
    upload with tags should not be held to the image-only bar), and one tag threshold for every tag
    (where micro precision equals recall, image-only: the hardest case the predictor serves)."""
    image_only = collect(net, batches_fn(), True, autocast_dtype)
    with_tags = collect(net, batches_fn(), False, autocast_dtype)
    _, tag_t = f1_at_balance(image_only["tags"], image_only["targets"])
    if not np.isfinite(tag_t):
        tag_t = 0.5
    return Calibration(
        character=character_thresholds(image_only["characters"], image_only["labels"], target_precision).tolist(),
        character_with_tags=character_thresholds(with_tags["characters"], with_tags["labels"],
                                                 target_precision).tolist(),
        tags=[float(tag_t)] * image_only["tags"].shape[1],
    )
