"""Evaluation metrics, on numpy arrays of scores.

- character top-1 / top-5 accuracy (reported image-only and image+tags by the evaluator);
- tag mAP over the tags that have at least one positive;
- tag micro-F1 at the threshold where micro precision equals recall (as WD tagger model cards
  report): precision = recall exactly when as many (image, tag) pairs are predicted as are true, so
  the threshold is the P-th highest score for P true pairs;
- per-character confidence thresholds so the predictor can abstain at a target precision.
"""

from __future__ import annotations

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the ``k`` highest scores. ``scores`` (N, C), labels (N,)."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean((top == labels[:, None]).any(1)))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall curve (step interpolation), one column."""
    n_pos = targets.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = targets[order].astype(np.float64)
    precision_at_hit = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at_hit * hits).sum() / n_pos)


def tag_map(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean average precision over tags with support, ``(N, K)`` scores and 0/1 targets."""
    aps = [average_precision(scores[:, j], targets[:, j]) for j in range(targets.shape[1]) if targets[:, j].any()]
    return float(np.mean(aps)) if aps else float("nan")


def f1_at_balance(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(micro-F1, threshold) where micro precision equals recall."""
    flat_scores, flat_targets = scores.ravel(), targets.ravel().astype(bool)
    n_pos = int(flat_targets.sum())
    if n_pos == 0:
        return float("nan"), float("nan")
    top = np.argpartition(-flat_scores, n_pos - 1)[:n_pos]
    threshold = float(flat_scores[top].min())
    f1 = float(flat_targets[top].sum() / n_pos)  # precision = recall = F1 here
    return f1, threshold


def _precision_threshold(conf: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest confidence t such that predictions with conf >= t have precision >= target; 1.0
    (never answer) when no threshold reaches it."""
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    precision = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    ok = np.nonzero(precision >= target)[0]
    if len(ok) == 0:
        return 1.0
    return float(conf[ok[-1]])


def character_thresholds(probs: np.ndarray, labels: np.ndarray, target_precision: float,
                         min_support: int = 5) -> np.ndarray:
    """Per-class abstention thresholds on the top softmax probability. A class predicted fewer than
    ``min_support`` times on the calibration set shares the global threshold."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    correct = pred == labels
    global_t = _precision_threshold(conf, correct, target_precision) if len(conf) else 1.0
    out = np.full(probs.shape[1], global_t, dtype=np.float64)
    for c in np.unique(pred):
        sel = pred == c
        if sel.sum() >= min_support:
            out[c] = _precision_threshold(conf[sel], correct[sel], target_precision)
    return out


def answered_at_thresholds(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """(coverage, precision) of a predictor that names its top character only when its probability
    reaches that character's threshold (else abstains): the share answered, and the share of answers
    right (nan when nothing is answered)."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    pred = probs.argmax(1)
    answered = probs.max(1) >= np.asarray(thresholds)[pred]
    coverage = float(answered.mean())
    precision = float((pred[answered] == labels[answered]).mean()) if answered.any() else float("nan")
    return coverage, precision


def figure(x: float) -> str:
    """A metric for a table: three decimals, ``-`` where it is undefined (nan: the precision of no answers)."""
    return "-" if x != x else f"{x:.3f}"
