"""``danmul demo`` / ``make demo``: the whole system end to end on one machine, on embedded defaults.

Each step says what it is doing; a failing step is named, with its reason, and the exit is non-zero.
Steps land with their issues: today the demo generates a synthetic Dan:mul dataset and prints its
statistics. Training, the streaming tagger and the backfill join as they are built.
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
    characters: int = 50
    images: int = 3000
    image_size: int = 128

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(characters=12, images=240, image_size=64)


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

    try:
        _step(1, "generate a synthetic Dan:mul dataset", synth)
    except StepFailed as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 1
    print(f"\ndemo finished; everything is under {out}")
    return 0
