"""Building networks and reading checkpoints for the jobs: the places where ``model/`` meets object
storage. ``model/`` itself only takes bytes or a reader."""

from __future__ import annotations

import pyarrow as pa

from ingest.schema import DatasetInfo
from ingest.shards import sample_column
from ingest.storage import Storage
from model.checkpoint import Checkpoint, load
from model.config import ModelConfig, preset
from model.network import DanmulNet, load_pretrained_image_weights, read_image_weights
from model.plan import MAX_IMAGE_SIZE, InputSize, choose_image_size
from model.preprocess import ImageError, long_side

SIZE_SAMPLE = 256  # train images whose headers choose the input size


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


def input_size_for(data: Storage, preset_name: str = "tiny", pretrained_image: str | None = None) -> InputSize:
    """The input size of a run that did not fix one (``model.plan.choose_image_size``), from the headers of
    the first :data:`SIZE_SAMPLE` train images in the shards training reads (nothing is decoded;
    unreadable ones are left out). Pretrained image weights keep the preset's size: their position
    embeddings are made for it."""
    from ray_jobs.train_data import split_shards

    own = preset(preset_name)
    # patch None: the timm model's own, 16 for the ViT the base preset names (its size is fixed anyway)
    size, patch = own.image_size, own.patch_size or 16
    if pretrained_image:
        return InputSize(size, f"the {preset_name} preset's size, which the pretrained image weights are made for")
    if MAX_IMAGE_SIZE.get(preset_name, size) <= size:
        return InputSize(size, f"the {preset_name} preset's size")
    sides: list[int] = []
    try:
        shards = [f"train/{f.path}" for f in split_shards(data, "train")]
        for image in sample_column(data, shards, "image", SIZE_SAMPLE):
            try:
                sides.append(long_side(image))  # any value: what is not an image is an ImageError
            except ImageError:
                continue
    except (OSError, ValueError, KeyError, pa.ArrowException):  # reading the split says what is wrong with it
        pass
    return choose_image_size(preset_name, size, patch, sides)


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
