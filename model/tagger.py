"""``Tagger``: the one predictor every front end uses (CLI, Serve app, Ray Data backfill).

    tagger = Tagger.from_checkpoint("runs/tiny/best")        # or Storage("s3://models/danmul")
    [pred] = tagger.predict([image_bytes], tags=[["1girl", "blue_hair"]])
    pred.characters  # [(name, score), ...] best first; [] when the model abstains
    pred.tags        # {tag: score} above each tag's threshold

Preprocessing, thresholds and the abstention rule come from the checkpoint; front ends never
re-implement them. Batched, under ``torch.inference_mode()``, on CUDA with bf16 when available.

On a GPU (settings; the CPU path is unchanged): the batch defaults to the preset's
(``model.config.default_batch_size``); inputs are copied from pinned host memory without blocking, and the
scores come back the same way (:meth:`Tagger.scores_async` returns before the GPU is done, so the caller can
prepare the next batch meanwhile); ``channels_last`` gives the image encoder's convolution that memory
layout; ``compile`` runs the network through ``torch.compile``, at one batch size (smaller batches are padded
to it, so it compiles once: :meth:`Tagger.warm_up` does that outside anything timed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from model.checkpoint import Checkpoint, Reader, load
from model.config import default_batch_size
from model.preprocess import Preprocessor
from model.vocab import TagVocab


@dataclass
class Prediction:
    characters: list[tuple[str, float]]  # top-k, best first; empty when abstained
    tags: dict[str, float]  # tags above their thresholds, best first
    model: str  # model version
    abstained: bool = False
    best_character: tuple[str, float] | None = None  # the top guess even when abstaining

    def to_dict(self) -> dict:
        return {
            "characters": [[n, round(s, 6)] for n, s in self.characters],
            "tags": {t: round(s, 6) for t, s in self.tags.items()},
            "model": self.model,
            "abstained": self.abstained,
            "best_character": None if self.best_character is None
            else [self.best_character[0], round(self.best_character[1], 6)],
        }


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Tagger:
    def __init__(self, ckpt: Checkpoint, device: str | torch.device | None = None, batch_size: int | None = None,
                 channels_last: bool = False, compile: bool = False):
        self.device = pick_device(device)
        self.net = ckpt.net.to(self.device).eval()
        self.config, self.labels, self.version, self.metrics = ckpt.config, ckpt.labels, ckpt.version, ckpt.metrics
        self.vocab = TagVocab(self.labels.tags)
        self.preprocess = Preprocessor.from_config(self.config)
        self.batch_size = batch_size or default_batch_size(self.config, self.device.type)
        self.set_thresholds()  # the checkpoint's calibrated ones
        # bf16 on GPU; exact fp32 on CPU, where bf16 is slow and changes numbers
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.channels_last = channels_last
        if channels_last:  # only the patch embedding is a convolution; the rest of a ViT is matrix products
            self.net.image_encoder.to(memory_format=torch.channels_last)
        self.compiled = compile
        self._forward = torch.compile(self.net, dynamic=False) if compile else self.net

    @classmethod
    def from_checkpoint(cls, src: str | os.PathLike | Reader, device: str | torch.device | None = None,
                        batch_size: int | None = None, **settings) -> Tagger:
        """``settings``: ``channels_last``, ``compile`` (see the class)."""
        return cls(load(src, device="cpu"), device=device, batch_size=batch_size, **settings)

    def warm_up(self, batch_size: int | None = None) -> None:
        """One batch through the network: CUDA kernels chosen and, with ``compile``, the graph compiled (tens of
        seconds for the base preset), before anything is timed or served."""
        s = self.config.image_size
        self.scores(torch.zeros(batch_size or self.batch_size, 3, s, s), [None] * (batch_size or self.batch_size))

    # -- thresholds, changeable at run time (Serve user_config) ----------------------------------------
    def set_thresholds(self, tag_threshold: float | None = None, character_threshold: float | None = None) -> None:
        """Override every tag threshold and/or every character threshold with one value; None keeps
        the checkpoint's calibrated ones."""
        self.tag_thresholds = np.asarray(
            self.labels.tag_thresholds if tag_threshold is None else [tag_threshold] * len(self.labels.tags),
            dtype=np.float32)  # fmt: skip
        self.character_thresholds = np.asarray(
            self.labels.character_thresholds if character_threshold is None
            else [character_threshold] * len(self.labels.characters), dtype=np.float32)  # fmt: skip
        self.character_thresholds_with_tags = np.asarray(
            self.labels.character_thresholds_with_tags if character_threshold is None
            else [character_threshold] * len(self.labels.characters), dtype=np.float32)  # fmt: skip

    # -- prediction -----------------------------------------------------------------------------------
    def scores(self, pixels: torch.Tensor, tags: Sequence[Sequence[str] | None]) -> tuple[np.ndarray, np.ndarray]:
        """Raw probabilities for preprocessed images ``(B, 3, S, S)``: character softmax ``(B, C)`` and
        tag sigmoid ``(B, K)``."""
        return self.scores_async(pixels, tags).result()

    @torch.inference_mode()
    def scores_async(self, pixels: torch.Tensor, tags: Sequence[Sequence[str] | None]) -> PendingScores:
        """:meth:`scores`, returning as soon as the work is queued on a GPU (at once on a CPU): the caller
        turns the previous batch's scores into predictions while this one runs, then calls ``result()``."""
        n = pixels.shape[0]
        tag_ids = self.vocab.batch(tags, self.config.max_tags)
        pad = self.batch_size - n if self.compiled and n < self.batch_size else 0
        if pad:  # one compiled graph: a short batch is padded to the batch size
            pixels = torch.cat([pixels, pixels.new_zeros((pad, *pixels.shape[1:]))])
            tag_ids = torch.cat([tag_ids, tag_ids[:1].expand(pad, -1)])
        pixels, tag_ids = self._to_device(pixels), self._to_device(tag_ids)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self._forward(pixels, tag_ids)
        chars = torch.softmax(out["characters"][:n].float(), dim=-1)
        tag_probs = torch.sigmoid(out["tags"][:n].float())
        if self.device.type != "cuda":
            return PendingScores(chars, tag_probs)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (chars, tag_probs)]
        for h, t in zip(host, (chars, tag_probs), strict=True):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingScores(*host, done)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """To the model's device; from pinned memory without blocking on a GPU."""
        if t.device == self.device:
            return t
        if self.device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def predict_tensors(self, pixels: torch.Tensor, tags: Sequence[Sequence[str] | None] | None = None,
                        top_k: int = 5) -> list[Prediction]:
        """Predict on already-preprocessed images (what a Ray Data predictor or Serve batch holds). On a GPU
        the next batch runs while the last one's scores become predictions."""
        n = pixels.shape[0]
        tags = list(tags) if tags is not None else [None] * n
        if len(tags) != n:
            raise ValueError(f"{n} images but {len(tags)} tag lists")
        out: list[Prediction] = []
        pending: list[tuple[int, PendingScores]] = []
        for start in range(0, n, self.batch_size):
            end = start + self.batch_size
            pending.append((start, self.scores_async(pixels[start:end], tags[start:end])))
            if len(pending) > 1:
                out += self.predictions(*pending.pop(0), tags, top_k)
        for start, scores in pending:
            out += self.predictions(start, scores, tags, top_k)
        return out

    def predictions(self, start: int, scores: PendingScores, tags: Sequence[Sequence[str] | None],
                    top_k: int = 5) -> list[Prediction]:
        """A batch's scores (of the images from ``start`` of ``tags``) -> predictions."""
        chars, tag_probs = scores.result()
        return [self.decode(c, t, top_k, with_tags=self.vocab.knows_any(given))
                for c, t, given in zip(chars, tag_probs, tags[start : start + len(chars)], strict=True)]

    def predict(self, images: Sequence[bytes | Image.Image], tags: Sequence[Sequence[str] | None] | None = None,
                top_k: int = 5) -> list[Prediction]:
        """Encoded images (or PIL images) and, optionally, the tags that came with each -> predictions.
        Raises ``model.preprocess.ImageError`` for an image that cannot be decoded: front ends that must
        survive bad input preprocess one by one first (see ``preprocess``) and route the failures."""
        if not len(images):
            return []
        return self.predict_tensors(self.preprocess.batch(images), tags, top_k)

    def decode(self, char_probs: np.ndarray, tag_probs: np.ndarray, top_k: int = 5,
               threshold: float | None = None, with_tags: bool = False) -> Prediction:
        """One image's probabilities -> a :class:`Prediction`. The character abstention thresholds are
        those calibrated for uploads with tags when ``with_tags`` (a tag the vocabulary knows came with
        it: ``self.vocab.knows_any``), else the image-only ones. With ``threshold``, that one value
        replaces every calibrated threshold for this image (Danbooru's ``/evaluate`` asks for one):
        characters and tags at or above it are listed."""
        k = min(top_k, len(char_probs))
        order = np.argpartition(-char_probs, k - 1)[:k] if k < len(char_probs) else np.arange(k)
        order = order[np.argsort(-char_probs[order], kind="stable")]  # the k best, best first (no full sort)
        best = int(order[0])
        best_score = float(char_probs[best])
        names = self.labels.characters
        if threshold is None:
            abstained = best_score < (self.character_thresholds_with_tags if with_tags else
                                      self.character_thresholds)[best]
            characters = [] if abstained else [(names[i], float(char_probs[i])) for i in order]
            above = np.nonzero(tag_probs >= self.tag_thresholds)[0]
        else:
            abstained = best_score < threshold
            characters = [(names[i], float(char_probs[i])) for i in order if char_probs[i] >= threshold]
            above = np.nonzero(tag_probs >= threshold)[0]
        above = above[np.argsort(-tag_probs[above])]
        return Prediction(
            characters=characters,
            tags={self.labels.tags[i]: float(tag_probs[i]) for i in above},
            model=self.version,
            abstained=bool(abstained),
            best_character=(names[best], best_score),
        )


class PendingScores:
    """Scores on their way back from the device: ``result()`` waits for them (a no-op on a CPU)."""

    def __init__(self, chars: torch.Tensor, tag_probs: torch.Tensor, done: torch.cuda.Event | None = None):
        self._chars, self._tags, self._done = chars, tag_probs, done

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self._done is not None:
            self._done.synchronize()
        return self._chars.numpy(), self._tags.numpy()
