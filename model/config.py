"""Model hyperparameters: one typed dataclass, saved inside every checkpoint (``config.json``), so
the model can be rebuilt from the checkpoint alone. Named presets: ``tiny`` (CPU tests, the demo)
and ``base`` (paper scale: ViT-B/16 at 224 px, 14,413 classes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Special tokens of the tag vocabulary, in this order at ids 0..4; real tags follow.
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID = range(len(SPECIAL_TOKENS))


@dataclass
class ModelConfig:
    # image encoder (timm)
    image_model: str = "vit_base_patch16_224"
    image_size: int = 224
    patch_size: int | None = None  # None: the timm model's own
    image_dim: int | None = None  # None: the timm model's own width, e.g. 768 for ViT-B
    image_depth: int | None = None
    image_heads: int | None = None
    pretrained_image: str | None = None  # local path or object-storage URI of timm weights
    # tag encoder (a BERT built from the config: model/bert.py)
    text_dim: int = 256
    text_depth: int = 2
    text_heads: int = 4
    max_tags: int = 64  # tag tokens kept per image (after [CLS])
    # fusion over image tokens + tag tokens
    fusion_dim: int = 768
    fusion_depth: int = 2
    fusion_heads: int = 12
    dropout: float = 0.1
    # heads
    num_characters: int = 14413
    num_tags: int = 10000  # real tags, without the special tokens
    # preprocessing that travels with the weights
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text_vocab_size(self) -> int:
        return self.num_tags + len(SPECIAL_TOKENS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    # ~1.5 M parameters: trains in minutes on 2 CPU cores at 64 px
    "tiny": dict(
        image_model="vit_tiny_patch16_224", image_size=64, patch_size=8, image_dim=96, image_depth=4,
        image_heads=3, text_dim=64, text_depth=1, text_heads=2, max_tags=32,
        fusion_dim=96, fusion_depth=1, fusion_heads=3, dropout=0.0,
    ),
    # the paper's scale: ViT-B/16 at 224 px
    "base": dict(
        image_model="vit_base_patch16_224", image_size=224, text_dim=256, text_depth=2, text_heads=4,
        max_tags=64, fusion_dim=768, fusion_depth=2, fusion_heads=12, dropout=0.1,
        num_characters=14413, num_tags=10000,
    ),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# Images per model batch on one GPU, by preset: large enough that the matrix units stay busy (ViT-B/16 at 224
# px reaches its bf16 plateau around 256 on an H100), small enough for a model replica's latency and for
# training memory. Another input size scales it by the change in tokens.
GPU_BATCH_SIZES = {"tiny": 1024, "base": 256}
CPU_BATCH_SIZE = 64  # on CPU a larger batch only adds latency


def default_batch_size(cfg: ModelConfig, device_type: str) -> int:
    """The model batch for ``cfg`` on ``device_type`` ("cuda" or "cpu"): :data:`GPU_BATCH_SIZES` for the preset
    whose image model ``cfg`` uses, scaled by (preset size / size)^2 and rounded down to a power of two
    (at least 16); 64 elsewhere."""
    if device_type != "cuda":
        return CPU_BATCH_SIZE
    for name, batch in GPU_BATCH_SIZES.items():
        p = PRESETS[name]
        if p["image_model"] == cfg.image_model and p.get("image_dim") == cfg.image_dim:
            scaled = batch * (p["image_size"] / cfg.image_size) ** 2
            return max(16, 1 << max(0, int(scaled).bit_length() - 1))
    return CPU_BATCH_SIZE
