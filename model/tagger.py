"""``Tagger``: the one predictor every front end uses (CLI, Serve app, Ray Data backfill).

    tagger = Tagger.from_checkpoint("runs/tiny/best")        # or Storage("s3://models/danmul")
    [pred] = tagger.predict([image_bytes], tags=[["1girl", "blue_hair"]])
    pred.characters  # [(name, score), ...] best first; [] when the model abstains
    pred.tags        # {tag: score} above each tag's threshold

Preprocessing, thresholds and the abstention rule come from the checkpoint; front ends never
re-implement them. Batched, under ``torch.inference_mode()``, on CUDA with bf16 when available.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from model.checkpoint import Checkpoint, Reader, load
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
    def __init__(self, ckpt: Checkpoint, device: str | torch.device | None = None, batch_size: int = 64):
        self.device = pick_device(device)
        self.net = ckpt.net.to(self.device).eval()
        self.config, self.labels, self.version, self.metrics = ckpt.config, ckpt.labels, ckpt.version, ckpt.metrics
        self.vocab = TagVocab(self.labels.tags)
        self.preprocess = Preprocessor.from_config(self.config)
        self.batch_size = batch_size
        self.set_thresholds()  # the checkpoint's calibrated ones
        # bf16 on GPU; exact fp32 on CPU, where bf16 is slow and changes numbers
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    @classmethod
    def from_checkpoint(cls, src: str | os.PathLike | Reader, device: str | torch.device | None = None,
                        batch_size: int = 64) -> Tagger:
        return cls(load(src, device="cpu"), device=device, batch_size=batch_size)

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
    @torch.inference_mode()
    def scores(self, pixels: torch.Tensor, tags: Sequence[Sequence[str] | None]) -> tuple[np.ndarray, np.ndarray]:
        """Raw probabilities for preprocessed images ``(B, 3, S, S)``: character softmax ``(B, C)`` and
        tag sigmoid ``(B, K)``."""
        tag_ids = self.vocab.batch(tags, self.config.max_tags).to(self.device)
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.net(pixels, tag_ids)
        chars = torch.softmax(out["characters"].float(), dim=-1).cpu().numpy()
        tag_probs = torch.sigmoid(out["tags"].float()).cpu().numpy()
        return chars, tag_probs

    def predict_tensors(self, pixels: torch.Tensor, tags: Sequence[Sequence[str] | None] | None = None,
                        top_k: int = 5) -> list[Prediction]:
        """Predict on already-preprocessed images (what a Ray Data predictor or Serve batch holds)."""
        n = pixels.shape[0]
        tags = list(tags) if tags is not None else [None] * n
        if len(tags) != n:
            raise ValueError(f"{n} images but {len(tags)} tag lists")
        out: list[Prediction] = []
        for start in range(0, n, self.batch_size):
            end = start + self.batch_size
            chars, tag_probs = self.scores(pixels[start:end], tags[start:end])
            out += [self.decode(c, t, top_k, with_tags=self.vocab.knows_any(given))
                    for c, t, given in zip(chars, tag_probs, tags[start:end], strict=True)]
        return out

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
        order = np.argsort(-char_probs)[:top_k]
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
