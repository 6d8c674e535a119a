"""The Dan:mul multimodal network, after "Anime Character Identification and Tag Prediction by
Multimodality Modeling: Dataset and Model" (2023) and Animesion's ViLT-style tag tokens.

    image (B, 3, S, S) --timm ViT, num_classes=0--> image tokens (B, 1+N, D_img) --proj--> (B, 1+N, D)
    tags  (B, T)       --BERT over tag tokens-----> tag tokens   (B, T, D_txt)   --proj--> (B, T, D)
    [image tokens + m_img ; tag tokens + m_txt] --fusion transformer--> (B, 1+N+T, D)
    fused image [CLS] --> character logits (B, C), tag logits (B, K)

The image-only case is an ordinary input: the tag sequence ``[CLS] [MASK] [SEP]`` (see
``model.curriculum.no_text``), whose learned embedding stands for "no tags given". Encoders split
``forward_features`` from the heads, so heads and fusion change without touching the encoders.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from model.bert import Bert, BertSettings
from model.config import PAD_ID, ModelConfig


class ImageEncoder(nn.Module):
    """A timm Vision Transformer without its classifier, returning all tokens ``(B, 1+N, D_img)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        overrides = {
            k: v
            for k, v in (("patch_size", cfg.patch_size), ("embed_dim", cfg.image_dim),
                         ("depth", cfg.image_depth), ("num_heads", cfg.image_heads))
            if v is not None
        }  # fmt: skip
        self.vit = timm.create_model(
            cfg.image_model, pretrained=False, num_classes=0, img_size=cfg.image_size, **overrides
        )
        self.dim = self.vit.num_features

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)  # (B, 1+N, D_img), final norm applied


class TagEncoder(nn.Module):
    """A BERT encoder built from the config (``model.bert``, no download) over tag tokens. Tags are a set, so
    every token gets position 0: the encoding does not depend on the order tags were listed in."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = Bert(BertSettings(
            vocab_size=cfg.text_vocab_size, hidden_size=cfg.text_dim, num_layers=cfg.text_depth,
            num_heads=cfg.text_heads, intermediate_size=4 * cfg.text_dim, max_positions=cfg.max_tags + 2,
            pad_id=PAD_ID, dropout=cfg.dropout,
        ))  # fmt: skip
        self.dim = cfg.text_dim

    def forward_features(self, tag_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(tag_ids, (tag_ids != PAD_ID).long(), torch.zeros_like(tag_ids))


class DanmulNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.fusion_dim
        self.image_encoder = ImageEncoder(cfg)
        self.tag_encoder = TagEncoder(cfg)
        self.image_proj = nn.Linear(self.image_encoder.dim, d)
        self.tag_proj = nn.Linear(self.tag_encoder.dim, d)
        self.modality = nn.Embedding(2, d)  # 0 = image token, 1 = tag token
        layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=cfg.fusion_heads, dim_feedforward=4 * d, dropout=cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )  # fmt: skip
        self.fusion = nn.TransformerEncoder(layer, num_layers=cfg.fusion_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.character_head = nn.Linear(d, cfg.num_characters)
        self.tag_head = nn.Linear(d, cfg.num_tags)

    def forward_features(self, images: torch.Tensor, tag_ids: torch.Tensor) -> torch.Tensor:
        """The fused image [CLS] token, ``(B, D)``."""
        img = self.image_proj(self.image_encoder.forward_features(images))  # (B, 1+N, D)
        txt = self.tag_proj(self.tag_encoder.forward_features(tag_ids))  # (B, T, D)
        img = img + self.modality.weight[0]
        txt = txt + self.modality.weight[1]
        tokens = torch.cat([img, txt], dim=1)  # (B, 1+N+T, D)
        pad = torch.cat(
            [torch.zeros(img.shape[:2], dtype=torch.bool, device=img.device), tag_ids == PAD_ID], dim=1
        )
        fused = self.fusion(tokens, src_key_padding_mask=pad)
        return self.norm(fused[:, 0])

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"characters": self.character_head(features), "tags": self.tag_head(features)}

    def forward(self, images: torch.Tensor, tag_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(images, tag_ids))


def read_image_weights(data: bytes) -> dict[str, torch.Tensor]:
    """A safetensors file of timm ViT weights (bytes read by the caller from disk or object
    storage). Pickled ``.pth`` files are refused: convert them once with safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"pretrained image weights must be a safetensors file: {e}") from None


def load_pretrained_image_weights(net: DanmulNet, state: dict[str, torch.Tensor]) -> None:
    """Load timm ViT weights (a state dict read from a local file or object storage by the caller)
    into the image encoder. Classifier weights are ignored; any other missing, unexpected or
    mis-shaped tensor is a clear error naming it."""
    state = {k.removeprefix("module.").removeprefix("vit."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = net.image_encoder.vit.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]  # fmt: skip
    missing = sorted(set(own) - set(state) - {k for k in own if k.startswith("head.")})
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:5]))
        if missing:
            parts.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors, e.g. {unexpected[:3]}")
        raise ValueError(f"pretrained image weights do not fit {net.cfg.image_model}: " + " | ".join(parts))
    net.image_encoder.vit.load_state_dict(state, strict=False)
