"""Examples -> one model batch, in one place: the Ray Data decode step of ``danmul train`` and the
in-memory loader (``ray_jobs/local_data.py``: the paper benchmark, ``danmul eval``, calibration) both
build their batches here, so both feed the network the same tensors.

:func:`encode` turns decoded images, the tags that came with each and class ids into numpy arrays
(what a Ray Data batch holds); an image that did not decode is ``None`` and keeps its row with
``ok = False``, so whoever trains can count it. :func:`model_batch` keeps the good rows as the tensors
:mod:`model.train` reads (see its docstring for the keys).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from model.preprocess import TrainAugment, to_tensor
from model.vocab import TagVocab


def encode(images: Sequence[Image.Image | None], tag_lists: Sequence[Sequence[str]], class_ids: Sequence[int],
           vocab: TagVocab, image_size: int, mean: Sequence[float], std: Sequence[float], max_tags: int,
           augment: TrainAugment | None = None) -> dict[str, np.ndarray]:
    """``images`` (B, 3, S, S) float32, ``tag_ids`` (B, T) int64, ``tag_targets`` (B, K) uint8,
    ``characters`` (B,) int64 and ``ok`` (B,) bool; a ``None`` image is all zeros with ``ok`` False."""
    n = len(images)
    pixels = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    for i, img in enumerate(images):
        if img is not None:
            pixels[i] = to_tensor(augment(img) if augment else img, image_size, mean, std).numpy()
            ok[i] = True
    tags = [[str(t) for t in ts] for ts in tag_lists]
    return {
        "images": pixels,
        "tag_ids": vocab.batch(tags, max_tags).numpy(),
        "tag_targets": vocab.multi_hot(tags).numpy().astype(np.uint8),
        "characters": np.asarray(class_ids, dtype=np.int64),
        "ok": ok,
    }


def model_batch(arrays: dict[str, np.ndarray | torch.Tensor], device: torch.device | str = "cpu",
                bad: list[int] | None = None) -> dict[str, torch.Tensor] | None:
    """The rows of an :func:`encode` batch whose image decoded, as tensors on ``device`` (tag targets as
    float); None when no row is left. Dropped rows are added to ``bad[0]``."""
    t = {k: torch.as_tensor(v) for k, v in arrays.items()}
    ok = t["ok"].bool()
    if bad is not None:
        bad[0] += int((~ok).sum())
    if not ok.any():
        return None
    rows = slice(None) if ok.all() else ok
    keep = {k: v[rows] for k, v in t.items() if k != "ok"}
    keep["tag_targets"] = keep["tag_targets"].float()
    return {k: v.to(device) for k, v in keep.items()}
