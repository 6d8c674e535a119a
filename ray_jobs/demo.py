"""``danmul demo`` / ``make demo``: the whole system end to end on one machine, on embedded defaults.

Each step says what it is doing; a failing step is named, with its reason, and the exit is non-zero.
Steps land with their issues: today the demo generates a synthetic Dan:mul dataset, trains the tiny
model with the curriculum (in one process until the Ray Train job lands), evaluates it image-only
and with tags, exports a calibrated checkpoint, and tags a few test images through ``Tagger``. The
streaming tagger and the backfill join as they are built.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class DemoSettings:
    characters: int = 24
    images: int = 2400
    image_size: int = 64
    epochs: int = 15

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(characters=8, images=240, image_size=32, epochs=2)


class StepFailed(RuntimeError):
    pass


def _step(n: int, title: str, fn: Callable[[], None]) -> None:
    print(f"\n== step {n}: {title}", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        raise StepFailed(f"step {n} ({title}) failed: {type(e).__name__}: {e}") from e
    print(f"-- step {n} done in {time.perf_counter() - t0:.1f} s", flush=True)


def run_demo(out: str, quick: bool = False) -> int:
    from ingest.stats import format_stats
    from ingest.synth import SynthConfig, synthesize

    settings = DemoSettings.quick() if quick else DemoSettings()
    out = os.path.abspath(out)
    data_uri = os.path.join(out, "data")

    def synth() -> None:
        cfg = SynthConfig(
            out=data_uri,
            characters=settings.characters,
            images=settings.images,
            image_size=settings.image_size,
            overwrite=True,
        )
        print(f"generating {cfg.images:,} images of {cfg.characters} characters at {cfg.image_size}px "
              f"into {data_uri}", flush=True)
        info = synthesize(cfg)
        print(format_stats(info))

    model_dir = os.path.join(out, "model")

    def train() -> None:
        import torch

        from ingest.shards import load_info
        from model import train as T
        from model.checkpoint import Labels, save
        from model.network import DanmulNet
        from model.vocab import TagVocab
        from ray_jobs.local_data import batches, load_split
        from ray_jobs.paper_claim import VARIANTS, FitConfig, fit, format_table, model_config_for

        info = load_info(data_uri)
        splits = {s: load_split(data_uri, s, info) for s in ("train", "val", "test")}
        vocab, cfg = TagVocab(info.tags), model_config_for(info, image_size=settings.image_size)
        torch.manual_seed(0)
        net = DanmulNet(cfg)
        print(f"training the tiny model ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters) for "
              f"{settings.epochs} epochs on {len(splits['train'].images):,} images, curriculum on", flush=True)
        fit(net, splits["train"], vocab, FitConfig(epochs=settings.epochs), VARIANTS["multimodal, curriculum"],
            log=lambda line: print(line, flush=True))
        metrics = T.evaluate(net, lambda: batches(splits["test"], vocab, cfg, 128))
        print(format_table({"tiny, curriculum": metrics}, len(splits["test"].images)))
        char_t, tag_t = T.calibrate(net, lambda: batches(splits["val"], vocab, cfg, 128), target_precision=0.9)
        version = save(model_dir, net, Labels(info.characters, info.tags, char_t, tag_t, 0.9), metrics)
        print(f"checkpoint {version} written to {model_dir}")

    def tag() -> None:
        from ingest.shards import iter_examples
        from ingest.storage import Storage
        from model.tagger import Tagger

        tagger = Tagger.from_checkpoint(model_dir)
        rows = [r for _, r in zip(range(4), iter_examples(Storage(data_uri), "test"), strict=False)]
        for with_tags in (False, True):
            preds = tagger.predict([r["image"] for r in rows], tags=[r["tags"] if with_tags else None for r in rows])
            print("with the upload's tags:" if with_tags else "image only:")
            for r, p in zip(rows, preds, strict=True):
                guess = "abstains" if p.abstained else f"{p.characters[0][0]} ({p.characters[0][1]:.2f})"
                top_tags = ", ".join(list(p.tags)[:6])
                print(f"  post {r['post_id']}: truth {r['character']}; model {guess}; tags {top_tags}")

    try:
        _step(1, "generate a synthetic Dan:mul dataset", synth)
        _step(2, "train the tiny multimodal model with curriculum learning, evaluate, export", train)
        _step(3, "tag test images with the exported checkpoint", tag)
    except StepFailed as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    print(f"\ndemo finished; everything is under {out}")
    return 0
