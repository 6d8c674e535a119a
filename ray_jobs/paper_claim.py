"""The paper's claim, reproduced on synthetic Dan:mul (``danmul bench paper``).

Trains three models on the same dataset with the same budget (epochs, batch size, seed):

- ``image-only``: never sees tags (the constant schedule with ``max_drop=1``);
- ``multimodal, no curriculum``: always sees the tags that came with the image (``none``);
- ``multimodal, curriculum``: starts with all tags and drops more and more of them (``cosine``);

and evaluates each on the test split, image-only and with tags. What we expect, and report either
way: with the curriculum, image-only accuracy close to the image-only model's; without it,
image-only accuracy falls; with tags, the multimodal models beat the image-only one.

Single process (one CPU or GPU); the Ray Train job runs the same steps distributed.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ingest.shards import load_info
from ingest.storage import Storage
from model import train as T
from model.curriculum import CurriculumConfig
from model.network import DanmulNet
from model.preprocess import TrainAugment
from model.vocab import TagVocab
from ray_jobs.local_data import Split, batches, load_split
from ray_jobs.model_io import model_config_for

VARIANTS: dict[str, CurriculumConfig] = {
    "image-only": CurriculumConfig(kind="constant", max_drop=1.0, max_mask=0.0),
    "multimodal, no curriculum": CurriculumConfig(kind="none"),
    "multimodal, curriculum": CurriculumConfig(kind="cosine", warmup=0.1, ramp=0.6, max_drop=0.75, max_mask=0.5),
}


@dataclass
class FitConfig:
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    optim: T.OptimConfig = field(default_factory=T.OptimConfig)


def fit(net: DanmulNet, train: Split, vocab: TagVocab, fit_cfg: FitConfig, curriculum: CurriculumConfig,
        log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train in place; returns one log dict per epoch (mean loss, samples/s, curriculum values)."""
    torch.manual_seed(fit_cfg.seed)
    generator = torch.Generator().manual_seed(fit_cfg.seed)
    optimizer = T.make_optimizer(net, fit_cfg.optim)
    augment = TrainAugment(seed=fit_cfg.seed)
    steps_per_epoch = max(1, len(train.images) // fit_cfg.batch_size)
    total = fit_cfg.epochs * steps_per_epoch
    history, step = [], 0
    for epoch in range(fit_cfg.epochs):
        t0, losses, logs = time.perf_counter(), [], {}
        for batch in batches(train, vocab, net.cfg, fit_cfg.batch_size, augment,
                             shuffle_seed=fit_cfg.seed * 1000 + epoch, drop_last=True):
            logs = T.train_step(net, optimizer, batch, step, total, fit_cfg.optim, curriculum, generator)
            losses.append(logs["loss"])
            step += 1
        seconds = time.perf_counter() - t0
        entry = {
            "epoch": epoch + 1, "loss": sum(losses) / len(losses),
            "samples_per_s": len(losses) * fit_cfg.batch_size / seconds,
            "text_drop": logs["text_drop"], "tag_mask": logs["tag_mask"],
        }  # fmt: skip
        history.append(entry)
        log(f"  epoch {entry['epoch']:3d}  loss {entry['loss']:.3f}  drop {entry['text_drop']:.2f}  "
            f"mask {entry['tag_mask']:.2f}  {entry['samples_per_s']:.0f} samples/s")
    return history


def run(data: str | None, epochs: int, seed: int, out: str | None = None, characters: int = 24,
        images: int = 2400, image_size: int = 64, workers: int = 0,
        log: Callable[[str], None] = print) -> dict[str, dict]:
    """Generate (unless ``data`` is given) a synthetic dataset, train the three variants, evaluate.
    With ``workers`` > 0 each variant trains through ``danmul train`` (Ray Train, that many workers)
    instead of in this process. Returns ``{variant: {"image_only": metrics, "image_tags": metrics}}``."""
    tmp = None
    if data is None:
        from ray_jobs.samples import synthetic_dataset

        tmp = tempfile.mkdtemp(prefix="danmul-paper-")
        log(f"generating synthetic Dan:mul: {characters} characters, {images} images, {image_size}px, seed {seed}")
        data = synthetic_dataset(os.path.join(tmp, "data"), characters, images, image_size, seed=seed)
    if workers > 0:
        return _run_distributed(data, epochs, seed, out or os.path.join(tmp or tempfile.mkdtemp(), "runs"),
                                image_size, workers, log)
    storage = Storage(data)
    info = load_info(storage)
    train, test = load_split(storage, "train", info), load_split(storage, "test", info)
    vocab = TagVocab(info.tags)
    cfg = model_config_for(info, image_size=image_size)
    fit_cfg = FitConfig(epochs=epochs, seed=seed)
    results = {}
    for name, curriculum in VARIANTS.items():
        log(f"\ntraining {name} ({curriculum.kind}), {epochs} epochs on {len(train.images)} images")
        torch.manual_seed(seed)
        net = DanmulNet(cfg)
        fit(net, train, vocab, replace(fit_cfg), curriculum, log)
        results[name] = T.evaluate(net, lambda: batches(test, vocab, cfg, 128))
        if out:
            from model.checkpoint import Labels, save

            save(Storage(out).child(name.replace(", ", "-").replace(" ", "-")), net,
                 Labels(info.characters, info.tags), results[name])
    log("\n" + format_table(results, len(test.images)))
    return results


def _run_distributed(data: str, epochs: int, seed: int, out: str, image_size: int, workers: int,
                     log: Callable[[str], None]) -> dict[str, dict]:
    from ray_jobs.train import TrainConfig
    from ray_jobs.train import run as train_run

    results = {}
    fit_cfg = FitConfig()
    for name, c in VARIANTS.items():
        log(f"\ntraining {name} ({c.kind}) with danmul train, {workers} workers, {epochs} epochs")
        cfg = TrainConfig(
            data=data, out=out, name=name.replace(", ", "-").replace(" ", "-"), epochs=epochs, seed=seed,
            workers=workers, image_size=image_size, batch_size=fit_cfg.batch_size // workers,
            curriculum=c.kind, curriculum_warmup=c.warmup, curriculum_ramp=c.ramp, max_drop=c.max_drop,
            max_mask=c.max_mask, lr=fit_cfg.optim.lr,
        )  # same global batch as the single-process run
        results[name] = train_run(cfg, log=log)["test"]
    log("\n" + format_table(results, results[next(iter(results))]["image_only"]["images"]))
    return results


def format_table(results: dict[str, dict], n_test: int) -> str:
    lines = [
        f"test split, {n_test} images | image-only top-1 | image-only top-5 | image+tags top-1 | image+tags top-5 "
        "| tag mAP (image-only)",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        io, it = r["image_only"], r["image_tags"]
        lines.append(f"| {name} | {io['top1']:.3f} | {io['top5']:.3f} | {it['top1']:.3f} | {it['top5']:.3f} "
                     f"| {io['tag_map']:.3f} |")
    lines[0] = "| " + lines[0] + " |"
    return "\n".join(lines)
