"""How long to train: a budget in optimizer steps, chosen from the dataset's size.

Every schedule (learning-rate warm-up and cosine decay, the curriculum's phases) is defined over
optimizer steps, so the number of steps is what decides whether a model learns. Ten epochs of the
paper's 1.6 M images are tens of thousands of steps; ten epochs of a platform's first 600 images are
about forty, and nothing learns in forty steps. So unless the user fixes ``epochs`` or ``steps``, a
plan takes the larger of ``default_epochs`` epochs and the preset's floor (:data:`MIN_STEPS`), and
the per-worker batch shrinks when the train split holds fewer than :data:`MIN_BATCHES_PER_WORKER`
batches per worker. No imports beyond the standard library: the command line reads it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

MIN_STEPS = {"tiny": 2000, "base": 5000}  # floor of a default plan, per model preset
MIN_BATCHES_PER_WORKER = 8  # below this many batches per worker and epoch, the batch shrinks
MIN_BATCH = 8
SHORT_PLAN_STEPS = 300  # fewer steps than this learn little from scratch: the plan line warns
DEFAULT_EPOCHS = 10
# The input size a preset grows to, unless --image-size fixes it: the train images' typical long side, from the
# preset's own size up to this. The look-alike set's emblem, the small detail that tells siblings apart, is 6-11
# px across at 64 px and 9-17 px at 96; 96 px is 144 patches of 8, about twice the compute of 64 px (on 2 CPU
# cores; docs/benchmarks.md). base stays at its 224.
MAX_IMAGE_SIZE = {"tiny": 96, "base": 224}


@dataclass(frozen=True)
class TrainingPlan:
    images: int  # images in the train split
    workers: int
    batch_size: int  # per worker
    requested_batch_size: int
    steps: int  # optimizer steps in all
    how: str  # "steps", "epochs" or "default": what fixed the length

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers

    drop_last: bool = False  # a last partial batch is dropped (the single-process loop) or is a step
    # epochs read as one pass (a Ray Train run over a small split repeats it, so each report covers enough
    # images): batches run on across the epochs of a pass, and only a pass's last batch may be partial
    epochs_per_pass: int = 1

    @property
    def steps_per_pass(self) -> int:
        """Steps in one pass of :attr:`epochs_per_pass` epochs: each worker's equal share in batches (every
        worker steps together), the last partial batch counted unless dropped."""
        share = self.images * self.epochs_per_pass // self.workers  # Ray splits the pass's rows, not each epoch's
        return max(1, share // self.batch_size if self.drop_last else -(-share // self.batch_size))

    @property
    def steps_per_epoch(self) -> int:
        """Steps in one epoch read on its own."""
        return replace(self, epochs_per_pass=1).steps_per_pass

    @property
    def epochs(self) -> int:
        """Epochs needed for :attr:`steps`, whole passes of them (the last may stop early)."""
        return max(1, math.ceil(self.steps / self.steps_per_pass)) * self.epochs_per_pass

    def describe(self, phases: dict[str, int] | None = None) -> str:
        """The line printed when training starts."""
        batch = f"batch {self.batch_size} x {self.workers} worker{'s' if self.workers != 1 else ''}"
        if self.batch_size != self.requested_batch_size:
            batch += f" (from {self.requested_batch_size}: the train split holds few batches per worker)"
        why = {"default": f"the larger of {DEFAULT_EPOCHS} epochs and the preset's floor", "epochs": "--epochs",
               "steps": "--steps"}[self.how]  # fmt: skip
        each = (f"{self.steps_per_pass:,} steps each" if self.epochs_per_pass == 1
                else f"{self.steps_per_pass:,} steps per {self.epochs_per_pass} epochs")
        line = f"plan: {self.images:,} images, {batch}, {self.steps:,} steps = {self.epochs:,} epochs ({each}; {why})"
        if phases:
            line += "; " + ", ".join(f"{name} at step {step:,}" for name, step in phases.items())
        return line

    def lines(self, phases: dict[str, int] | None = None) -> list[str]:
        """What a run prints when it starts: the plan, and the warning when there is one."""
        warning = self.warning()
        return [self.describe(phases), *([warning] if warning else [])]

    def warning(self) -> str | None:
        """Why this plan may not learn, or None."""
        if self.steps >= SHORT_PLAN_STEPS:
            return None
        return (f"warning: {self.steps} optimizer steps are too few to learn from scratch (a model needs some "
                f"hundreds at least): leave --epochs and --steps unset for the default plan, or give "
                f"--steps {MIN_STEPS['tiny']} or more (tiny; {MIN_STEPS['base']} for base)")


def make_plan(images: int, batch_size: int, workers: int = 1, epochs: int | None = None, steps: int | None = None,
              preset: str = "tiny", min_steps: int | None = None, drop_last: bool = False) -> TrainingPlan:
    """The plan for ``images`` train images. ``steps`` wins over ``epochs``; with neither, the default
    budget: ``max(DEFAULT_EPOCHS epochs, min_steps)`` (``min_steps`` defaults to the preset's floor).
    The batch shrinks on a small split unless ``epochs`` is given (then the run is what was asked)."""
    if images < 1:
        raise ValueError("the train split is empty: nothing to train on")
    if batch_size < 1 or workers < 1:
        raise ValueError("batch size and workers must be at least 1")
    if steps is not None and steps < 1:
        raise ValueError("--steps must be at least 1")
    if epochs is not None and epochs < 1:
        raise ValueError("--epochs must be at least 1")
    if images < workers:
        raise ValueError(f"the train split ({images} images) is smaller than the {workers} workers: use fewer "
                         "workers or more images")
    per_worker = images // workers
    batch = batch_size
    if epochs is None and per_worker < MIN_BATCHES_PER_WORKER * batch_size:
        batch = max(1, min(batch_size, max(MIN_BATCH, per_worker // MIN_BATCHES_PER_WORKER)))
    if drop_last:
        batch = min(batch, per_worker)
    plan = TrainingPlan(images, workers, batch, batch_size, 1, "default", drop_last)
    if steps is not None:
        total, how = steps, "steps"
    elif epochs is not None:
        total, how = epochs * plan.steps_per_epoch, "epochs"
    else:
        floor = MIN_STEPS.get(preset, MIN_STEPS["tiny"]) if min_steps is None else min_steps
        total, how = max(DEFAULT_EPOCHS * plan.steps_per_epoch, floor), "default"
    return TrainingPlan(images, workers, batch, batch_size, total, how, drop_last)


@dataclass(frozen=True)
class InputSize:
    size: int  # the model's input side, px
    why: str  # for the start of a run: what chose it


def choose_image_size(preset: str, preset_size: int, patch: int, long_sides: list[int]) -> InputSize:
    """The input size for a run that did not fix one: the median long side of a sample of the train images
    (``long_sides``; their detail is what a larger input can use), rounded down to whole ``patch``es and
    kept between the preset's own size and :data:`MAX_IMAGE_SIZE`. With no sample (no image readable),
    the preset's size."""
    if not long_sides:
        return InputSize(preset_size, f"the {preset} preset's size: no train image's size could be read")
    median = sorted(long_sides)[len(long_sides) // 2]
    top = max(preset_size, MAX_IMAGE_SIZE.get(preset, preset_size))
    size = min(top, max(preset_size, median // patch * patch))
    if size == preset_size and median <= preset_size:
        why = f"the {preset} preset's size; the train images' median long side is {median} px"
    elif size == top:
        why = f"the train images' median long side is {median} px; {top} px at most for the {preset} preset"
    else:
        why = f"the train images' median long side, {median} px, in whole patches of {patch} px"
    return InputSize(size, why)
