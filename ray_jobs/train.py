"""``danmul train``: distributed data-parallel training with Ray Train, fed by Ray Data.

    shards (local or s3://) --Ray Data: read, decode, augment (CPU tasks)--> get_dataset_shard
        --> one TorchTrainer worker per GPU (CPU workers otherwise), DDP, bf16 autocast on GPU
        --> every epoch: validation, ray.train.report + checkpoint to {out}/{name}/, best K kept
        --> at the end: best checkpoint exported to {out}/{name}/model (Tagger layout), thresholds
            calibrated on val, test split evaluated image-only and with tags, metrics.json written

Thin: the step, the evaluation and the checkpoint format are ``model/``'s; the reading is
``ingest/``'s. Re-running the same command with the same ``--out`` and ``--name`` resumes from the
last checkpoint (Ray Train V2 semantics); a worker that dies mid-run is restarted from it
(``--max-failures``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ingest.schema import DatasetInfo
from ingest.shards import load_info
from ingest.storage import Storage
from model import train as training
from model.batch import model_batch
from model.checkpoint import CONFIG, LABELS, METRICS, WEIGHTS, Labels, load, load_train_state, save, save_train_state
from model.config import ModelConfig
from model.curriculum import phase_steps
from model.vocab import TagVocab
from ray_jobs.train_config import TrainConfig
from ray_jobs.train_data import make_dataset, model_inputs, read_split, train_images

REPORT_MIN_IMAGES = 2048  # a step-budget run reports (validates, checkpoints) at most once per this many images


def report_group(plan, epochs_given: bool) -> int:
    """Epochs per report. With ``--epochs`` every epoch is reported; a step-budget run over a small split
    groups epochs so each report covers at least :data:`REPORT_MIN_IMAGES` images: a report costs a
    validation pass and a checkpoint, and each pass of Ray Data its start-up, which would otherwise
    outweigh the training of a few hundred images."""
    if epochs_given:
        return 1
    return max(1, min(plan.epochs, -(-REPORT_MIN_IMAGES // plan.images)))


# -- the training loop, on every worker -----------------------------------------------------------------


def _good_batches(batches, device, bad: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Model batches from Ray Data batches (:func:`model.batch.model_batch`): rows whose image did not
    decode are dropped and counted in ``bad[0]``; a batch left with no rows is skipped."""
    for batch in batches:
        good = model_batch(batch, device, bad)
        if good is not None:
            yield good


def _all_reduce(value: float, op: str = "sum") -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return float(t.item())


def _quiet_train_reports() -> None:
    """Ray Train logs a "Reporting training result ..." line with every metric at INFO on each worker, on a
    logger named after its source file: keep those for the session's log files, off the console."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_train_reports()

    cfg = TrainConfig(**config["train"])
    mcfg = ModelConfig.from_dict(config["model"])
    characters, tags = config["characters"], config["tags"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_bf16 = device.type == "cuda"
    torch.manual_seed(cfg.seed)

    from ray_jobs.model_io import build_net

    net = build_net(mcfg, cfg.endpoint_url)
    start_epoch, step, resumed = 0, 0, ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            net.load_state_dict(load(d).net.state_dict())
    net = ray.train.torch.prepare_model(net)
    inner = net.module if hasattr(net, "module") else net
    optim = cfg.optim_config()
    optimizer = training.make_optimizer(net, optim)
    if resumed:
        with resumed.as_directory() as d:
            state = load_train_state(d, optimizer)
        start_epoch, step = int(state["epoch"]), int(state["global_step"])
        if rank == 0:
            print(f"[danmul] resuming after epoch {start_epoch} (global step {step})", flush=True)
    curriculum = cfg.curriculum_config()
    plan = config["plan"]
    batch_size, total_steps, epochs, group = plan["batch_size"], plan["steps"], plan["epochs"], plan["group"]
    by_epochs = cfg.epochs is not None  # whole epochs, as asked; else a step budget, spent to the step
    until = sys.maxsize if by_epochs else total_steps  # an epoch is what the shards hold, whatever the count said
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    train_shard = ray.train.get_dataset_shard("train")
    labels = Labels(characters, tags)

    def agree(has_batch: bool) -> bool:  # every worker steps together, or none does (DDP)
        return _all_reduce(1.0 if has_batch else 0.0, "min") > 0

    progress = Storage(config["run_dir"], cfg.endpoint_url) if rank == 0 else None
    gauges = _train_metrics(cfg.metrics_port) if rank == 0 else None
    # a report covers ``group`` epochs: one pass of the train dataset, which repeats a small split
    first = start_epoch
    while first < epochs if by_epochs else step < total_steps:
        if progress:
            _log_progress(progress, {"event": "start", "epoch": first + 1, "global_step": step})
        t0 = time.perf_counter()
        bad = [0]
        good = _good_batches(train_shard.iter_torch_batches(
            batch_size=batch_size, local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=cfg.seed + first
        ), device, bad)
        pass_start = step

        def on_step(at: int, logs: dict[str, float]) -> None:
            if gauges:
                gauges.TRAIN_LOSS.set(logs["loss"])
                gauges.TRAIN_STEP.set(at)
                gauges.TRAIN_TEXT_DROP.set(logs.get("text_drop", 0.0))

        done = training.train_pass(net, optimizer, good, step, total_steps, optim, curriculum, generator,
                                   torch.bfloat16 if use_bf16 else None, agree=agree, on_step=on_step,
                                   until=until)
        if done.step < until:  # out of data, not of budget: drain the leftovers (a batch or so) so
            for _ in good:  # every bad row is counted; a spent budget leaves the rest of the pass unread
                pass
        if done.step == pass_start:
            raise RuntimeError("a pass over the train split gave no training step: are all its images bad?")
        step = done.step
        seconds = time.perf_counter() - t0
        epoch = epochs if not by_epochs and step >= total_steps and first + group >= epochs else first + group
        metrics = {
            "epoch": epoch,
            "global_step": step,
            "train_loss": _all_reduce(float(np.mean(done.losses)) if done.losses else 0.0) / world,
            "samples_per_s": _all_reduce(done.samples / seconds),
            "bad_images": int(_all_reduce(bad[0])),
            "text_drop": done.logs.get("text_drop", 0.0),
            "tag_mask": done.logs.get("tag_mask", 0.0),
            "epoch_seconds": seconds,
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                val_shard = ray.train.get_dataset_shard("val")
                v = training.evaluate(
                    inner, lambda s=val_shard: _good_batches(s.iter_torch_batches(batch_size=128), device),
                    torch.bfloat16 if use_bf16 else None)
                for mode, values in v.items():
                    metrics |= {f"val_{mode}_{k}": float(x) for k, x in values.items()}
                save(tmp, inner, labels, {"validation": v, "epoch": epoch})
                save_train_state(tmp, optimizer, {"epoch": epoch, "global_step": step})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                print(epoch_line(metrics, epochs, total_steps), flush=True)  # the worker's log; the driver prints too
                if gauges:
                    gauges.TRAIN_EPOCH.set(epoch)
                    gauges.TRAIN_SAMPLES_PER_SECOND.set(metrics["samples_per_s"])
                    for mode in ("image_only", "image_tags"):
                        gauges.TRAIN_VAL_TOP1.labels(mode).set(metrics[f"val_{mode}_top1"])
            ray.train.report(metrics, checkpoint=checkpoint)
        if progress:
            _log_progress(progress, {"event": "end", **metrics})
        first += group


def _train_metrics(port: int):
    """The ``danmul_train_*`` gauges, served on ``port`` by this (rank-0) worker; None when off."""
    if not port:
        return None
    from dashboards import metrics

    # a restarted worker on the same node may find the port still the old one's: it keeps trying
    metrics.serve_node_metrics(port)
    return metrics


PROGRESS = "progress.jsonl"


def epoch_line(metrics: dict[str, Any], epochs: int, steps: int) -> str:
    """One line per report (an epoch, or a group of epochs of a small split), as the console shows it."""
    return (f"[danmul] epoch {metrics['epoch']}/{epochs}  step {metrics['global_step']}/{steps}  loss "
            f"{metrics['train_loss']:.3f}  val top-1 image-only "
            f"{metrics['val_image_only_top1']:.3f} / with tags {metrics['val_image_tags_top1']:.3f}  drop "
            f"{metrics['text_drop']:.2f}  {metrics['samples_per_s']:.0f} samples/s  bad images {metrics['bad_images']}")


class ProgressPrinter:
    """Prints the run's epoch lines on the driver as the rank-0 worker records them (``progress.jsonl``),
    so the console shows each once, whether or not the workers' own output is forwarded."""

    def __init__(self, run_dir: Storage, epochs: int, steps: int, log=print, every_s: float = 1.0):
        import threading

        self.run_dir, self.epochs, self.steps, self.log, self.every_s = run_dir, epochs, steps, log, every_s
        self.shown = len(read_progress(run_dir))  # what an earlier run of the same OUT/NAME recorded
        self.started = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="danmul-progress", daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self._show()

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self._show()

    def _show(self) -> None:
        try:
            events = read_progress(self.run_dir)
        except (OSError, ValueError):  # mid-write or storage trouble: the next look will do
            return
        for event in events[self.shown :]:
            if event.get("event") == "end" and "val_image_only_top1" in event:
                self.log(epoch_line(event, self.epochs, self.steps))
            elif event.get("event") == "start" and not self.started and event.get("global_step", 0) > 0:
                self.log(f"[danmul] resuming after epoch {event['epoch'] - 1} (global step {event['global_step']})")
            self.started = self.started or event.get("event") == "start"
        self.shown = max(self.shown, len(events))


def _log_progress(run_dir: Storage, event: dict[str, Any]) -> None:
    """Append one JSON line to the run's progress log (read-modify-write: object stores cannot append;
    the file stays small, a few lines an epoch)."""
    import json

    old = run_dir.read_bytes(PROGRESS) if run_dir.exists(PROGRESS) else b""
    run_dir.write_bytes(PROGRESS, old + json.dumps({"time": time.time(), **event}).encode() + b"\n")


def read_progress(run_dir: Storage) -> list[dict[str, Any]]:
    import json

    if not run_dir.exists(PROGRESS):
        return []
    events = []
    for n, line in enumerate(run_dir.read_text(PROGRESS).splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError(f"cannot read {run_dir.uri_of(PROGRESS)}: line {n} is not JSON") from None
        if isinstance(event, dict):
            events.append(event)
    return events


# -- the driver -----------------------------------------------------------------------------------------


def _ensure_ray(cfg: TrainConfig, workers: int) -> None:
    from ray_jobs.local_ray import ensure_ray

    # a local Ray gets the training workers' CPUs plus some for Ray Data's decoding tasks, or the two
    # would wait on each other; the dashboard serves the State API Ray Train cleans up with
    ensure_ray(cfg.address, workers * cfg.cpus_per_worker + cfg.data_cpus, dashboard=True)


SETTINGS = "danmul-train.yaml"  # in the run's folder: the settings it runs with, the input size chosen


def recorded_image_size(run_dir: Storage) -> int | None:
    """The input size a run already trained at, from its settings file, when it may have a checkpoint to
    resume (a checkpoint folder, or an epoch ended); None when it has nothing to resume."""
    import yaml

    from ray_jobs.train_config import check_image_size

    resumable = any(e.get("event") == "end" for e in read_progress(run_dir)) or any(
        f.path.startswith("checkpoint_") for f in run_dir.list())
    if not resumable or not run_dir.exists(SETTINGS):
        return None
    where = run_dir.uri_of(SETTINGS)
    try:
        recorded = yaml.safe_load(run_dir.read_text(SETTINGS))
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise ValueError(f"cannot read {where} to resume the run: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"cannot read {where} to resume the run: not a mapping of settings")
    size = recorded.get("image_size")
    if size is None:  # before the size was chosen, a run trained at its preset's
        from model.config import PRESETS, preset

        preset_name = recorded.get("preset", "tiny")
        if not isinstance(preset_name, str) or preset_name not in PRESETS:
            raise ValueError(f"cannot read {where} to resume the run: preset {str(preset_name)[:40]!r}")
        size = preset(preset_name).image_size
    return check_image_size(size, f"image_size in {where}")


def with_input_size(cfg: TrainConfig, data: Storage, run_dir: Storage | None = None) -> tuple[TrainConfig, str | None]:
    """``cfg`` with its input size set, and the line that says what chose it (None when given): the size
    of the run being resumed in ``run_dir``, else as given, else chosen from the train images
    (``ray_jobs.model_io.input_size_for``). A given size other than the resumed run's is an error: its
    checkpoint's position embeddings are made for its own."""
    resumed = recorded_image_size(run_dir) if run_dir is not None else None
    if resumed is not None:
        if cfg.image_size not in (None, resumed):
            raise ValueError(f"run {run_dir.uri} trained at {resumed} px: resume it with --image-size {resumed} "
                             "(or none), or train a new run with another --name")
        line = None if cfg.image_size else f"input size {resumed}px: the size of the run being resumed"
        return dataclasses.replace(cfg, image_size=resumed), line
    if cfg.image_size is not None:
        return cfg, None
    from ray_jobs.model_io import input_size_for

    chosen = input_size_for(data, cfg.preset, cfg.pretrained_image)
    line = f"input size {chosen.size}px: {chosen.why} (--image-size sets it)"
    return dataclasses.replace(cfg, image_size=chosen.size), line


def run(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Train (or resume), export the best checkpoint, evaluate it; returns the test metrics."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    from ray_jobs.config import dump

    data = Storage(cfg.data, cfg.endpoint_url)
    info = load_info(data)
    out = Storage(cfg.out, cfg.endpoint_url)
    run_dir = out.child(cfg.name)

    _ensure_ray(cfg, cfg.workers or 2)
    gpus_available = int(ray.cluster_resources().get("GPU", 0))
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker >= 0 else (1 if gpus_available else 0)
    workers = cfg.workers or (max(1, int(gpus_available // gpus)) if gpus else 2)
    train_rows, kept = read_split(data, "train")
    cfg, size_line = with_input_size(cfg, data, run_dir)  # before the run's settings are written: they record it
    mcfg = cfg.model_config(info)
    run_dir.write_text(SETTINGS, dump(cfg))
    log(f"training {cfg.preset} ({mcfg.image_model} at {mcfg.image_size}px, {info.num_characters} characters, "
        f"{len(info.tags)} tags) on {workers} worker(s) x {gpus or 0:g} GPU, run {run_dir.uri}")
    if size_line:
        log(size_line)
    plan = cfg.plan(train_images(train_rows, kept, info.splits["train"], log), workers)
    group = report_group(plan, cfg.epochs is not None)
    plan = dataclasses.replace(plan, epochs_per_pass=group)  # the epochs the run will count
    curriculum = cfg.curriculum_config()
    for line in plan.lines(phase_steps(curriculum, plan.steps)):
        log(line)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": dataclasses.asdict(cfg), "model": mcfg.to_dict(), "characters": info.characters,
            "tags": info.tags, "run_dir": run_dir.uri,
            "plan": {"batch_size": plan.batch_size, "steps": plan.steps, "epochs": plan.epochs, "group": group},
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=RunConfig(
            name=cfg.name, storage_path=out.path(), storage_filesystem=out.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own per-epoch line says enough
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.checkpoint_metric,
                                               checkpoint_score_order="max"),
        ),
        datasets={"train": model_inputs(train_rows, info, mcfg, augment=True, repeat=group),
                  "val": make_dataset(data, "val", info, mcfg, augment=False)},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )  # fmt: skip
    with ProgressPrinter(run_dir, plan.epochs, plan.steps, log):
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if cfg.checkpoint_metric in m]
    if not ranked:
        raise RuntimeError("training reported no checkpoint")
    best, best_metrics = max(ranked, key=lambda cm: cm[1][cfg.checkpoint_metric])
    log(f"best checkpoint: epoch {best_metrics['epoch']} ({cfg.checkpoint_metric} "
        f"{best_metrics[cfg.checkpoint_metric]:.3f})")
    epochs_run = [e.get("epoch") for e in read_progress(run_dir) if e.get("event") == "end"]
    return export_and_evaluate(best, run_dir.child("model"), data, info, cfg, epochs_run, log)


def export_and_evaluate(best, dest: Storage, data: Storage, info: DatasetInfo, cfg: TrainConfig,
                        epochs_run: list[int], log=print) -> dict[str, Any]:
    """Copy the best checkpoint's model files to ``dest`` (the Tagger layout), calibrate thresholds on
    val, evaluate on test, and write labels.json and metrics.json there."""
    with best.as_directory() as d:
        for name in (WEIGHTS, CONFIG, LABELS, METRICS):
            with open(os.path.join(d, name), "rb") as f:
                dest.write_bytes(name, f.read())
    ckpt = load(dest)
    vocab = TagVocab(info.tags)
    net, mcfg = ckpt.net, ckpt.config
    from ray_jobs.local_data import stream_batches

    skipped = [0]
    cal = training.calibrate(
        net, lambda: stream_batches(data, "val", info, vocab, mcfg, 128, skipped=skipped), cfg.target_precision)
    test = training.evaluate(net, lambda: stream_batches(data, "test", info, vocab, mcfg, 128, skipped=skipped),
                             thresholds=cal.character, thresholds_with_tags=cal.character_with_tags)
    metrics = {"test": test, "validation": ckpt.metrics.get("validation"), "best_epoch": ckpt.metrics.get("epoch"),
               "epochs_run": epochs_run, "skipped_images": skipped[0], "model": ckpt.version}
    dest.write_bytes(LABELS, _labels_json(Labels(info.characters, info.tags, cal.character, cal.tags,
                                                  cfg.target_precision, cal.character_with_tags)))
    dest.write_bytes(METRICS, _json(metrics))
    log(format_eval(test, f"test split, model {ckpt.version}"))
    log(f"answered and precision: at the abstention thresholds calibrated on val for precision {cfg.target_precision} "
        "(image-only, and with tags for uploads that come with tags)")
    verdict = weak_model_advice(test, cfg.target_precision, None if cfg.pretrained_image else mcfg.image_size)
    if verdict:
        log(verdict)
    log(f"exported to {dest.uri}")
    return metrics


MIN_COVERAGE = 0.5  # below this share answered image-only, the end of training says the model is weak


def weak_model_advice(test: dict[str, dict[str, float]], target_precision: float,
                      image_size: int | None = None) -> str | None:
    """What to change when the calibrated model would answer too few image-only uploads, or None."""
    coverage = test["image_only"].get("coverage")
    if coverage is None or coverage >= MIN_COVERAGE:
        return None
    larger = (f"a larger input when the details that tell characters apart are small (--image-size, {image_size} "
              "px now), " if image_size else "")
    return (f"warning: at precision {target_precision} the model answers only {coverage:.0%} of image-only test "
            f"images (with tags {test['image_tags'].get('coverage', float('nan')):.0%}): the streaming tagger will "
            "abstain on most uploads that come without tags. Train longer (--steps, or leave --epochs unset for "
            f"the default budget), add images (at least 10 per character, more for look-alikes), {larger}start "
            "from pretrained image weights (--pretrained-image), or accept more mistakes (--target-precision 0.8).")


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(obj, indent=1, default=float).encode()


def _labels_json(labels: Labels) -> bytes:
    return _json(dataclasses.asdict(labels))


def format_eval(metrics: dict[str, dict[str, float]], title: str) -> str:
    """The evaluation table; answered (coverage) and precision columns when thresholds were applied."""
    from model.metrics import figure

    answered = "coverage" in metrics["image_only"]
    extra = " answered | precision |" if answered else ""
    rows = [f"| {title} | top-1 | top-5 | tag mAP | tag F1 (P=R) |{extra} images |",
            "|---|---|---|---|---|" + ("---|---|" if answered else "") + "---|"]
    for mode, label in (("image_only", "image only"), ("image_tags", "image + tags")):
        m = metrics[mode]
        cells = f" {figure(m['coverage'])} | {figure(m['precision'])} |" if answered else ""
        rows.append(f"| {label} | {m['top1']:.3f} | {m['top5']:.3f} | {m['tag_map']:.3f} | {m['tag_f1']:.3f} |"
                    f"{cells} {m['images']} |")
    return "\n".join(rows)


def evaluate_checkpoint(checkpoint: str, data_uri: str, split: str = "test", endpoint_url: str | None = None,
                        batch_size: int = 128) -> dict[str, dict[str, float]]:
    """``danmul eval``: the same table for any checkpoint and split (one process, streaming); with the
    checkpoint's calibrated abstention thresholds, the share answered and the precision of the answers."""
    from ray_jobs.local_data import stream_batches
    from ray_jobs.model_io import load_checkpoint

    ckpt = load_checkpoint(checkpoint, endpoint_url)
    data = Storage(data_uri, endpoint_url)
    info = load_info(data)
    if info.characters != ckpt.labels.characters:
        raise ValueError("the checkpoint's characters differ from the dataset's: not trained on this dataset")
    vocab = TagVocab(info.tags)
    calibrated = ckpt.labels.abstain_precision is not None
    labels = ckpt.labels
    return training.evaluate(ckpt.net, lambda: stream_batches(data, split, info, vocab, ckpt.config, batch_size),
                             thresholds=labels.character_thresholds if calibrated else None,
                             thresholds_with_tags=labels.character_thresholds_with_tags if calibrated else None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: danmul train ...")
