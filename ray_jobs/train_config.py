"""The settings of ``danmul train``, importable without torch (so ``danmul --help`` stays fast): defaults
here (the curriculum's from ``model.defaults``), then a YAML file, then flags (``ray_jobs.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model import defaults

if TYPE_CHECKING:
    from ingest.schema import DatasetInfo
    from model.config import ModelConfig
    from model.curriculum import CurriculumConfig
    from model.train import OptimConfig

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024  # a given --image-size, px: 2 patches a side to 4,096 ViT-B tokens


def check_image_size(size: object, what: str = "--image-size") -> int:
    """A model input size given by a user or a file: a whole number of px, from 16 to 1024."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"{what} must be a whole number of px from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
                         f"not {str(size)[:40]!r}")
    return size


@dataclass
class TrainConfig:
    data: str = field(metadata={"help": "Dan:mul dataset URI (local folder or s3://bucket/prefix)"})
    out: str = field(metadata={"help": "where runs live (local folder or s3://...); the run is OUT/NAME"})
    name: str = field(default="danmul", metadata={"help": "run name; the same OUT and NAME resume a run"})
    preset: str = field(default="tiny", metadata={"help": "model preset: tiny or base"})
    image_size: int | None = field(default=None, metadata={
        "help": "model input size, px (default: the train images' median long side, from the preset's size to its "
                "largest: 64-96 for tiny, 224 for base)"})
    pretrained_image: str | None = field(default=None, metadata={"help": "safetensors ViT weights, path or s3://"})
    epochs: int | None = field(default=None, metadata={
        "help": "passes over the train split (default: from the step budget; see --steps)"})
    steps: int | None = field(default=None, metadata={
        "help": "optimizer steps in all (default: the larger of 10 epochs and the preset's floor, 2000 for tiny)"})
    batch_size: int = field(default=64, metadata={
        "help": "batch size per worker (smaller when the train split holds under 8 batches per worker)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW, warm-up then cosine)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    label_smoothing: float = field(default=0.0, metadata={"help": "character cross-entropy label smoothing"})
    tag_loss: str = field(default="asl", metadata={"help": "tag loss: asl or bce"})
    curriculum: str = field(default=defaults.CURRICULUM_KIND, metadata={"help": "none, constant, linear or cosine"})
    curriculum_warmup: float = field(default=defaults.CURRICULUM_WARMUP, metadata={
        "help": "share of training with all tags"})
    curriculum_ramp: float = field(default=defaults.CURRICULUM_RAMP, metadata={
        "help": "share of training spent ramping up"})
    max_drop: float = field(default=defaults.CURRICULUM_MAX_DROP, metadata={
        "help": "final chance of dropping all tags of a sample"})
    max_mask: float = field(default=defaults.CURRICULUM_MAX_MASK, metadata={
        "help": "final share of individual tags removed"})
    workers: int = field(default=0, metadata={"help": "training workers (0: one per GPU, else 2)"})
    gpus_per_worker: float = field(default=-1, metadata={"help": "GPUs per worker (-1: 1 if the cluster has GPUs)"})
    cpus_per_worker: float = field(default=1, metadata={"help": "CPUs reserved per training worker"})
    data_cpus: int = field(default=2, metadata={"help": "extra CPUs for Ray Data decoding on a local Ray"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: start a local Ray)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "best checkpoints kept"})
    checkpoint_metric: str = field(default="val_image_only_top1", metadata={"help": "metric that ranks checkpoints"})
    max_failures: int = field(default=3, metadata={"help": "worker failures tolerated (restart from checkpoint)"})
    target_precision: float = field(default=0.9, metadata={"help": "precision the abstention thresholds target"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (else AWS_ENDPOINT_URL)"})
    metrics_port: int = field(default=0, metadata={
        "help": "serve danmul_train_* metrics from the rank-0 worker on this port (0: off)"})

    def __post_init__(self) -> None:
        if self.image_size is not None:
            check_image_size(self.image_size)

    def plan(self, images: int, workers: int):
        """The step budget for ``images`` train images on ``workers`` workers (``model.plan``)."""
        from model.plan import make_plan

        return make_plan(images, self.batch_size, workers, self.epochs, self.steps, self.preset)

    def curriculum_config(self) -> CurriculumConfig:
        from model.curriculum import CurriculumConfig

        return CurriculumConfig(kind=self.curriculum, warmup=self.curriculum_warmup, ramp=self.curriculum_ramp,
                                max_drop=self.max_drop, max_mask=self.max_mask)

    def optim_config(self) -> OptimConfig:
        from model.losses import LossConfig
        from model.train import OptimConfig

        return OptimConfig(lr=self.lr, weight_decay=self.weight_decay,
                           loss=LossConfig(label_smoothing=self.label_smoothing, tag_loss=self.tag_loss))

    def model_config(self, info: DatasetInfo) -> ModelConfig:
        from ray_jobs.model_io import model_config_for

        return model_config_for(info, self.preset, self.image_size, self.pretrained_image)
