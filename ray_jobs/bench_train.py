"""``danmul bench train``: how busy the Ray Data input pipeline keeps the model.

One run, same machine, same workers, same DDP step:
  A. ``danmul train``: shards read, decoded and augmented by Ray Data, fed with get_dataset_shard;
  B. the same step on tensors already in memory (one batch made once, reused).
Reports samples/s of each over the epochs after the first (start-up excluded) and A/B. The goal is
A/B >= 0.9. On a small CPU-only machine the decoding competes with training for the same cores, so
the ratio there measures contention as much as the pipeline; on GPU nodes decoding runs on CPUs the
model does not use.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch


def in_memory_loop(config: dict[str, Any]) -> float:
    import ray.train
    import ray.train.torch

    from model import train as training
    from model.config import ModelConfig
    from model.curriculum import CurriculumConfig
    from model.network import DanmulNet
    from ray_jobs.train import _all_reduce

    mcfg = ModelConfig.from_dict(config["model"])
    torch.manual_seed(0)
    net = ray.train.torch.prepare_model(DanmulNet(mcfg))
    device = ray.train.torch.get_device()
    optim = training.OptimConfig()
    optimizer = training.make_optimizer(net, optim)
    b = config["batch_size"]
    batch = {  # one batch, made once: no input pipeline at all
        "images": torch.randn(b, 3, mcfg.image_size, mcfg.image_size, device=device),
        "tag_ids": torch.randint(5, mcfg.text_vocab_size, (b, mcfg.max_tags + 2), device=device),
        "characters": torch.randint(0, mcfg.num_characters, (b,), device=device),
        "tag_targets": (torch.rand(b, mcfg.num_tags, device=device) < 0.1).float(),
    }
    batch["tag_ids"][:, 0], batch["tag_ids"][:, -1] = 1, 2
    curriculum = CurriculumConfig(**config["curriculum"])
    steps, total = config["steps_per_epoch"], config["steps_per_epoch"] * config["epochs"]
    step, rates = 0, []
    for epoch in range(config["epochs"]):
        t0 = time.perf_counter()
        step = training.train_pass(net, optimizer, itertools.repeat(batch, steps), step, total, optim, curriculum).step
        rates.append(_all_reduce(steps * b / (time.perf_counter() - t0)))
        ray.train.report({"epoch": epoch + 1, "samples_per_s": rates[-1]})
    return float(np.mean(rates[1:])) if len(rates) > 1 else rates[0]  # Result.return_value (rank 0)


def main(epochs: int = 4, workers: int = 2, characters: int = 24, images: int = 2400, image_size: int = 64,
         batch_size: int = 64) -> int:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ingest.shards import load_info
    from ingest.storage import Storage
    from ray_jobs.samples import synthetic_dataset
    from ray_jobs.train import TrainConfig, _ensure_ray, read_progress, run

    root = tempfile.mkdtemp(prefix="danmul-bench-train-")
    data = os.path.join(root, "data")
    synthetic_dataset(data, characters, images, image_size)
    cfg = TrainConfig(data=data, out=os.path.join(root, "runs"), name="pipeline", epochs=epochs, workers=workers,
                      image_size=image_size, batch_size=batch_size)
    _ensure_ray(cfg, workers)
    try:
        run(cfg, log=lambda s: None)
        ends = [e for e in read_progress(Storage(cfg.out).child(cfg.name)) if e["event"] == "end"]
        pipeline = float(np.mean([e["samples_per_s"] for e in ends[1:]]))
        info = load_info(data)
        trainer = TorchTrainer(
            in_memory_loop,
            train_loop_config={
                "model": cfg.model_config(info).to_dict(), "batch_size": batch_size, "epochs": epochs,
                "steps_per_epoch": info.splits["train"] // (batch_size * workers),
                "curriculum": vars(cfg.curriculum_config()),
            },
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=RunConfig(name="in-memory", storage_path=os.path.join(root, "runs")),
        )  # fmt: skip
        result = trainer.fit()
        in_memory = float(result.return_value)
        # the input pipeline alone, no training: its capacity when it has the cores to itself
        from ray_jobs.train_data import make_dataset

        ds = make_dataset(Storage(data), "train", info, cfg.model_config(info), augment=True)
        capacity = 0.0
        for _ in range(3):  # the first pass warms up
            t0, n = time.perf_counter(), 0
            for b in ds.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=4 * batch_size):
                n += len(b["ok"])
            capacity = n / (time.perf_counter() - t0)
    finally:
        ray.shutdown()
    print(f"\n{workers} workers, tiny preset at {image_size}px, batch {batch_size} per worker, epochs 2-{epochs}:\n")
    print("| input | samples/s |\n|---|---|")
    print(f"| Ray Data from shards (decode + augment) | {pipeline:,.0f} |")
    print(f"| tensors already in memory | {in_memory:,.0f} |")
    print(f"| the input pipeline alone, no training | {capacity:,.0f} |")
    print(f"\npipeline / in-memory: {pipeline / in_memory:.2f} (goal: at least 0.90)")
    print(f"input capacity / model rate: {capacity / in_memory:.2f} (above 1: given its own cores, the input "
          "keeps up)")
    return 0
