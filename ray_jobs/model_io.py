"""Building networks and reading checkpoints for the jobs: the places where ``model/`` meets object
storage. ``model/`` itself only takes bytes or a reader."""

from __future__ import annotations

from ingest.schema import DatasetInfo
from ingest.storage import Storage
from model.checkpoint import Checkpoint, load
from model.config import ModelConfig, preset
from model.network import DanmulNet, load_pretrained_image_weights, read_image_weights


def model_config_for(info: DatasetInfo, preset_name: str = "tiny", image_size: int | None = None,
                     pretrained_image: str | None = None) -> ModelConfig:
    """A preset sized for a dataset: its classes and tag vocabulary, optionally another input size
    and pretrained image weights."""
    overrides: dict = {"num_characters": info.num_characters, "num_tags": len(info.tags)}
    if image_size:
        overrides["image_size"] = image_size
    if pretrained_image:
        overrides["pretrained_image"] = pretrained_image
    return preset(preset_name, **overrides)


def build_net(cfg: ModelConfig, endpoint_url: str | None = None) -> DanmulNet:
    """A fresh network; with ``cfg.pretrained_image`` (a local path or ``s3://`` URI of a safetensors
    file), the image encoder starts from those weights. Nothing is fetched from a hub."""
    net = DanmulNet(cfg)
    if cfg.pretrained_image:
        storage = Storage(cfg.pretrained_image, endpoint_url)
        load_pretrained_image_weights(net, read_image_weights(storage.read_bytes()))
    return net


def load_checkpoint(uri: str, endpoint_url: str | None = None, device: str = "cpu") -> Checkpoint:
    return load(Storage(uri, endpoint_url), device=device)
