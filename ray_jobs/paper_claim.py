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
from model import train as training
from model.curriculum import CurriculumConfig
from model.metrics import figure
from model.network import DanmulNet
from model.plan import TrainingPlan, make_plan
from model.preprocess import TrainAugment
from model.vocab import TagVocab
from ray_jobs.local_data import Split, batches, load_split
from ray_jobs.model_io import input_size_for, model_config_for

VARIANTS: dict[str, CurriculumConfig] = {
    "image-only": CurriculumConfig(kind="constant", max_drop=1.0, max_mask=0.0),
    "multimodal, no curriculum": CurriculumConfig(kind="none"),
    "multimodal, curriculum": CurriculumConfig(),  # danmul train's defaults (model/defaults.py)
}


@dataclass
class FitConfig:
    epochs: int | None = None  # with neither epochs nor steps: the default step budget (model.plan)
    steps: int | None = None
    batch_size: int = 64
    seed: int = 0
    optim: training.OptimConfig = field(default_factory=training.OptimConfig)

    def plan(self, images: int) -> TrainingPlan:
        return make_plan(images, self.batch_size, 1, self.epochs, self.steps, drop_last=True)


def fit(net: DanmulNet, train: Split, vocab: TagVocab, fit_cfg: FitConfig, curriculum: CurriculumConfig,
        log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train in place with the plan's step budget; returns one log dict per epoch (mean loss, samples/s,
    curriculum values). Logs about ten lines however many epochs the plan has."""
    torch.manual_seed(fit_cfg.seed)
    generator = torch.Generator().manual_seed(fit_cfg.seed)
    optimizer = training.make_optimizer(net, fit_cfg.optim)
    augment = TrainAugment(seed=fit_cfg.seed)
    plan = fit_cfg.plan(len(train.images))
    history, step = [], 0
    for epoch in range(plan.epochs):
        t0 = time.perf_counter()
        done = training.train_pass(net, optimizer, batches(train, vocab, net.cfg, plan.batch_size, augment,
                                                    shuffle_seed=fit_cfg.seed * 1000 + epoch, drop_last=True),
                            step, plan.steps, fit_cfg.optim, curriculum, generator)  # fmt: skip
        step = done.step
        seconds = time.perf_counter() - t0
        entry = {
            "epoch": epoch + 1, "step": step, "loss": sum(done.losses) / max(1, len(done.losses)),
            "samples_per_s": done.samples / seconds, "text_drop": done.logs.get("text_drop", 0.0),
            "tag_mask": done.logs.get("tag_mask", 0.0),
        }  # fmt: skip
        history.append(entry)
        if (epoch + 1) % max(1, plan.epochs // 10) == 0 or epoch + 1 == plan.epochs:
            log(f"  epoch {entry['epoch']:3d}  step {step:5d}  loss {entry['loss']:.3f}  drop {entry['text_drop']:.2f}"
                f"  mask {entry['tag_mask']:.2f}  {entry['samples_per_s']:.0f} samples/s")
    return history


def run(data: str | None, epochs: int | None = None, seed: int = 0, out: str | None = None, characters: int = 24,
        images: int = 2400, image_size: int | None = None, workers: int = 0, steps: int | None = None,
        log: Callable[[str], None] = print) -> dict[str, dict]:
    """Generate (unless ``data`` is given) a synthetic dataset, train the three variants with the same
    step budget (``model.plan``: ``steps``, else ``epochs``, else the default), evaluate, and print the
    table and the paper's ordering checks. With ``workers`` > 0 each variant trains through ``danmul
    train`` (Ray Train, that many workers) instead of in this process. Returns ``{variant:
    {"image_only": metrics, "image_tags": metrics}}``. ``image_size`` is the synthetic images' side and the
    model's input; unset, the images are 64 px and the input is chosen from them as danmul train does."""
    from ray_jobs.train_config import check_image_size

    if image_size is not None:
        check_image_size(image_size)
    tmp = None
    if data is None:
        from ray_jobs.samples import synthetic_dataset

        tmp = tempfile.mkdtemp(prefix="danmul-paper-")
        side = image_size or SYNTHETIC_SIZE
        log(f"generating synthetic Dan:mul: {characters} characters, {images} images, {side}px, seed {seed}")
        data = synthetic_dataset(os.path.join(tmp, "data"), characters, images, side, seed=seed)
    if workers > 0:
        results = _run_distributed(data, epochs, steps, seed, out or os.path.join(tmp or tempfile.mkdtemp(), "runs"),
                                   image_size, workers, log)
    else:
        results = _run_local(data, epochs, steps, seed, out, image_size, log)
    log("\n" + format_table(results, results[next(iter(results))]["image_only"]["images"]))
    log("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in ordering_checks(results)))
    return results


def _run_local(data: str, epochs: int | None, steps: int | None, seed: int, out: str | None,
               image_size: int | None, log: Callable[[str], None]) -> dict[str, dict]:
    storage = Storage(data)
    info = load_info(storage)
    train, val, test = (load_split(storage, split, info) for split in ("train", "val", "test"))
    vocab = TagVocab(info.tags)
    why = "--image-size"
    if image_size is None:
        chosen = input_size_for(storage)
        image_size, why = chosen.size, chosen.why
    cfg = model_config_for(info, image_size=image_size)
    log(f"model input {image_size}px ({why})")
    fit_cfg = FitConfig(epochs=epochs, steps=steps, seed=seed)
    plan = fit_cfg.plan(len(train.images))
    for line in plan.lines():
        log(line)
    results = {}
    for name, curriculum in VARIANTS.items():
        log(f"\ntraining {name} ({curriculum.kind}): {plan.steps:,} steps on {len(train.images):,} images")
        torch.manual_seed(seed)
        net = DanmulNet(cfg)
        fit(net, train, vocab, replace(fit_cfg), curriculum, log)
        # abstention thresholds calibrated on val, as danmul train does: how much the stream would answer
        cal = training.calibrate(net, lambda: batches(val, vocab, cfg, 128), TARGET_PRECISION)
        results[name] = training.evaluate(net, lambda: batches(test, vocab, cfg, 128), thresholds=cal.character,
                                          thresholds_with_tags=cal.character_with_tags)
        if out:
            from model.checkpoint import Labels, save

            save(Storage(out).child(name.replace(", ", "-").replace(" ", "-")), net,
                 Labels(info.characters, info.tags), results[name])
    return results


def _run_distributed(data: str, epochs: int | None, steps: int | None, seed: int, out: str, image_size: int | None,
                     workers: int, log: Callable[[str], None]) -> dict[str, dict]:
    from ray_jobs.train import TrainConfig
    from ray_jobs.train import run as train_run

    results = {}
    fit_cfg = FitConfig()
    for name, c in VARIANTS.items():
        log(f"\ntraining {name} ({c.kind}) with danmul train, {workers} workers")
        cfg = TrainConfig(
            data=data, out=out, name=name.replace(", ", "-").replace(" ", "-"), epochs=epochs, steps=steps,
            seed=seed, workers=workers, image_size=image_size, batch_size=fit_cfg.batch_size // workers,
            curriculum=c.kind, curriculum_warmup=c.warmup, curriculum_ramp=c.ramp, max_drop=c.max_drop,
            max_mask=c.max_mask, lr=fit_cfg.optim.lr,
        )  # same global batch as the single-process run
        results[name] = train_run(cfg, log=log)["test"]
    return results


SYNTHETIC_SIZE = 64  # side of the synthetic images when no dataset is given
TARGET_PRECISION = 0.9  # danmul train's default --target-precision
CURRICULUM_CLOSE = 0.02  # curriculum image-only top-1 within this of the image-only model's
NO_CURRICULUM_GAP = 0.10  # no-curriculum image-only top-1 at least this far below the image-only model's


def ordering_checks(results: dict[str, dict]) -> list[tuple[str, bool]]:
    """The paper's three orderings, as (statement with the figures, holds) pairs."""
    image = results["image-only"]["image_only"]["top1"]
    cur_io = results["multimodal, curriculum"]["image_only"]["top1"]
    cur_it = results["multimodal, curriculum"]["image_tags"]["top1"]
    none_io = results["multimodal, no curriculum"]["image_only"]["top1"]
    return [
        (f"with tags beats image-only: curriculum model with tags {cur_it:.3f} > image-only model {image:.3f}",
         cur_it > image),
        (f"curriculum keeps image-only accuracy: {cur_io:.3f} within {CURRICULUM_CLOSE:.2f} of the image-only "
         f"model's {image:.3f} (or above)", cur_io >= image - CURRICULUM_CLOSE),
        (f"without curriculum image-only falls: {none_io:.3f} at least {NO_CURRICULUM_GAP:.2f} below "
         f"{image:.3f}", none_io <= image - NO_CURRICULUM_GAP),
    ]


def format_table(results: dict[str, dict], n_test: int) -> str:
    """The three-model table; with the share answered (and right) at the calibrated thresholds when the
    results have them."""
    answered = all("coverage" in r["image_only"] for r in results.values())
    extra = " | image-only answered (precision) | image+tags answered (precision)" if answered else ""
    lines = [
        f"test split, {n_test} images | image-only top-1 | image-only top-5 | image+tags top-1 | image+tags top-5 "
        f"| tag mAP (image-only){extra}",
        "|---|---|---|---|---|---|" + ("---|---|" if answered else ""),
    ]
    for name, r in results.items():
        io, it = r["image_only"], r["image_tags"]
        cells = (f" {figure(io['coverage'])} ({figure(io['precision'])}) | {figure(it['coverage'])} "
                 f"({figure(it['precision'])}) |" if answered else "")
        lines.append(f"| {name} | {io['top1']:.3f} | {io['top5']:.3f} | {it['top1']:.3f} | {it['top5']:.3f} "
                     f"| {io['tag_map']:.3f} |{cells}")
    lines[0] = "| " + lines[0] + " |"
    if answered:
        lines.append(f"answered: the share of test images named at the abstention thresholds calibrated on val for "
                     f"precision {TARGET_PRECISION} (the precision of those answers in brackets)")
    return "\n".join(lines)
