"""Defaults that more than one module uses, in one place (no imports: anything may read them cheaply).

The training command (``ray_jobs.train_config.TrainConfig``) and the curriculum (``model.curriculum``)
both take their curriculum defaults from here, so a schedule built from either is the same."""

CURRICULUM_KIND = "cosine"
CURRICULUM_WARMUP = 0.1  # fraction of training with all tags visible
CURRICULUM_RAMP = 0.6  # fraction of training spent ramping up
CURRICULUM_MAX_DROP = 0.9  # final probability of dropping a sample's whole tag sequence
CURRICULUM_MAX_MASK = 0.5  # final fraction of individual tags removed
