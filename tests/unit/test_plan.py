"""The training budget: steps chosen from the dataset's size, the batch adapting to a small split, the
plan line and its warning, the curriculum phases over steps, and the report grouping of Ray Train runs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from model.curriculum import CurriculumConfig, phase_steps, schedule
from model.plan import DEFAULT_EPOCHS, MAX_IMAGE_SIZE, MIN_STEPS, SHORT_PLAN_STEPS, choose_image_size, make_plan
from ray_jobs.train import REPORT_MIN_IMAGES, report_group
from ray_jobs.train_config import TrainConfig


def test_a_small_dataset_gets_the_preset_floor_and_a_smaller_batch():
    plan = make_plan(430, batch_size=64, workers=2)  # the 614-image look-alike set's train split
    assert plan.batch_size == 430 // 2 // 8 == 26  # 8 batches per worker and epoch
    assert plan.steps == MIN_STEPS["tiny"] == 2000
    assert plan.steps_per_epoch == 9  # each worker's 215 images in batches of 26, the last partial
    assert plan.epochs == 223  # 2000 / 9, rounded up
    grouped = replace(plan, epochs_per_pass=report_group(plan, epochs_given=False))  # as a Ray Train run reads it
    assert grouped.epochs_per_pass == 5 and grouped.steps_per_pass == 42  # 5 x 215 / 26 = 41.3, rounded up
    assert grouped.epochs == 48 * 5  # 2000 / 42 = 47.6 passes: 48
    assert plan.warning() is None
    line = plan.describe({"text dropping from": 200})
    assert "(42 steps per 5 epochs;" in grouped.describe() and "= 240 epochs" in grouped.describe()
    for part in ("430 images", "batch 26 x 2 workers (from 64", "2,000 steps = 223 epochs (9 steps each",
                 "text dropping from at step 200"):
        assert part in line


def test_a_large_dataset_trains_ten_epochs_and_keeps_its_batch():
    plan = make_plan(1_280_000, batch_size=64, workers=8, preset="base")
    assert plan.batch_size == 64
    assert plan.steps == DEFAULT_EPOCHS * (1_280_000 // 512) == 25_000
    assert plan.epochs == DEFAULT_EPOCHS


def test_steps_win_over_epochs_and_epochs_over_the_default():
    assert make_plan(1000, 50, 1, epochs=3, steps=77).steps == 77
    plan = make_plan(1000, 50, 1, epochs=3)
    assert (plan.steps, plan.epochs, plan.how) == (60, 3, "epochs")
    assert make_plan(1000, 50, 1, min_steps=10).steps == DEFAULT_EPOCHS * 20


def test_a_plan_too_short_to_learn_says_so():
    plan = make_plan(430, 64, 2, epochs=10)  # what ten epochs of a few hundred images used to be
    assert plan.batch_size == 64  # epochs asked for: the run is what was asked, batch included
    assert plan.steps == 10 * 4 < SHORT_PLAN_STEPS  # 215 images per worker: 4 batches of 64
    assert "too few to learn" in plan.warning() and "--steps" in plan.warning()
    assert plan.lines() == [plan.describe(), plan.warning()]  # what a run prints at start
    assert make_plan(430, 64, 2).lines() == [make_plan(430, 64, 2).describe()]  # no warning, no line


def test_tiny_splits_still_train_with_a_batch_of_at_least_one():
    plan = make_plan(5, 64, 2)
    assert plan.batch_size >= 1 and plan.steps_per_epoch >= 1 and plan.steps == MIN_STEPS["tiny"]
    one_process = make_plan(5, 64, 1, drop_last=True)  # a dropped last batch must not leave epochs empty
    assert one_process.batch_size == 5 and one_process.steps_per_epoch == 1


def test_fewer_images_than_workers_is_refused():
    with pytest.raises(ValueError, match="smaller than the 4 workers"):
        make_plan(3, 64, 4)


@pytest.mark.parametrize("kwargs", [dict(images=0), dict(batch_size=0), dict(workers=0), dict(steps=0),
                                    dict(epochs=0), dict(steps=-3)])  # fmt: skip
def test_impossible_plans_are_refused(kwargs):
    args = dict(images=100, batch_size=8, workers=1) | kwargs
    with pytest.raises(ValueError):
        make_plan(**args)


def test_curriculum_phases_are_named_at_the_steps_the_schedule_uses():
    cfg = CurriculumConfig()
    phases = phase_steps(cfg, 2000)
    start, full = phases.values()
    assert schedule(cfg, start - 1, 2000).drop == 0 < schedule(cfg, start + 1, 2000).drop
    assert schedule(cfg, full, 2000).drop == pytest.approx(cfg.max_drop)
    assert schedule(cfg, full - 50, 2000).drop < cfg.max_drop
    assert phase_steps(CurriculumConfig(kind="none"), 2000) == {}


def test_train_config_plans_from_its_flags():
    cfg = TrainConfig(data="d", out="o")
    assert cfg.plan(430, 2).steps == 2000
    assert TrainConfig(data="d", out="o", steps=500).plan(430, 2).steps == 500
    assert TrainConfig(data="d", out="o", epochs=4).plan(430, 2).epochs == 4


def test_reports_group_epochs_of_a_small_split_unless_epochs_were_asked_for():
    small = make_plan(430, 64, 2)
    assert report_group(small, epochs_given=True) == 1
    group = report_group(small, epochs_given=False)
    assert group * 430 >= REPORT_MIN_IMAGES > (group - 1) * 430
    assert report_group(make_plan(1_280_000, 64, 8), epochs_given=False) == 1
    short = make_plan(430, 64, 2, steps=16)  # two epochs in all: one report covers them
    assert report_group(short, epochs_given=False) == short.epochs == 2


def test_coverage_and_precision_at_thresholds_count_answers_and_abstentions():
    import numpy as np

    from model.metrics import answered_at_thresholds

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    # class 0 answers from 0.7, class 1 from 0.5: rows 0, 2, 3 answered; row 1 (0.6 < 0.7) abstains
    assert answered_at_thresholds(probs, labels, np.array([0.7, 0.5])) == (0.75, 1.0)
    coverage, precision = answered_at_thresholds(probs, labels, np.array([0.5, 0.9]))  # rows 0 and 1 answered
    assert (coverage, precision) == (0.5, 0.5)
    coverage, precision = answered_at_thresholds(probs, labels, np.array([1.0, 1.0]))
    assert coverage == 0 and np.isnan(precision)


def test_training_warns_when_the_model_would_abstain_on_most_uploads():
    from ray_jobs.train import format_eval, weak_model_advice

    def test_metrics(coverage: float) -> dict:
        one = {"top1": 0.3, "top5": 0.8, "tag_map": 0.5, "tag_f1": 0.5, "images": 100, "coverage": coverage,
               "precision": 0.9}
        return {"image_only": one, "image_tags": dict(one, coverage=0.4)}

    advice = weak_model_advice(test_metrics(0.05), 0.9)
    assert "answers only 5% of image-only" in advice and "--steps" in advice and "--target-precision" in advice
    assert "--image-size, 64 px now" in weak_model_advice(test_metrics(0.05), 0.9, image_size=64)
    assert weak_model_advice(test_metrics(0.7), 0.9) is None
    table = format_eval(test_metrics(0.05), "test")
    assert "| answered | precision |" in table and "| 0.050 | 0.900 |" in table
    nothing = test_metrics(0.0)
    nothing["image_only"]["precision"] = float("nan")  # no answer: no precision
    assert "| 0.000 | - |" in format_eval(nothing, "test")


def test_the_paper_ordering_checks_pass_and_fail_on_the_numbers():
    from ray_jobs.paper_claim import ordering_checks

    def results(image: float, cur_io: float, cur_it: float, none_io: float) -> dict:
        return {"image-only": {"image_only": {"top1": image}},
                "multimodal, curriculum": {"image_only": {"top1": cur_io}, "image_tags": {"top1": cur_it}},
                "multimodal, no curriculum": {"image_only": {"top1": none_io}}}  # fmt: skip

    assert [ok for _, ok in ordering_checks(results(0.80, 0.79, 0.95, 0.30))] == [True, True, True]
    assert [ok for _, ok in ordering_checks(results(0.80, 0.77, 0.79, 0.75))] == [False, False, False]
    lines = [what for what, _ in ordering_checks(results(0.80, 0.79, 0.95, 0.30))]
    assert "0.950 > image-only model 0.800" in lines[0]


def test_the_paper_table_shows_what_the_stream_would_answer_when_thresholds_were_calibrated():
    from ray_jobs.paper_claim import format_table

    def mode(top1: float, coverage: float | None = None) -> dict:
        m = {"top1": top1, "top5": 0.9, "tag_map": 0.4}
        return m if coverage is None else {**m, "coverage": coverage, "precision": 0.92}

    calibrated = {"image-only": {"image_only": mode(0.5, 0.25), "image_tags": mode(0.5, 0.3)},
                  "multimodal, curriculum": {"image_only": mode(0.6, 0.4), "image_tags": mode(0.9, 0.85)}}
    table = format_table(calibrated, 121)
    assert "| multimodal, curriculum | 0.600 | 0.900 | 0.900 | 0.900 | 0.400 | 0.400 (0.920) | 0.850 (0.920) |" in table
    assert "calibrated on val for precision 0.9" in table
    silent = {**calibrated, "image-only": {"image_only": {**mode(0.5, 0.0), "precision": float("nan")},
                                           "image_tags": mode(0.5, 0.3)}}
    row = "| image-only | 0.500 | 0.900 | 0.500 | 0.900 | 0.400 | 0.000 (-) | 0.300 (0.920) |"
    assert row in format_table(silent, 121)
    plain = format_table({name: {m: mode(r[m]["top1"]) for m in r} for name, r in calibrated.items()}, 121)
    assert "answered" not in plain
    assert plain.splitlines()[-1] == "| multimodal, curriculum | 0.600 | 0.900 | 0.900 | 0.900 | 0.400 |"


def test_a_pass_stops_at_the_budget_or_when_the_workers_do_not_all_have_a_batch():
    import itertools

    import torch

    from model import train as training
    from model.config import preset
    from model.network import DanmulNet

    cfg = preset("tiny", num_characters=3, num_tags=6, image_size=16, patch_size=8)
    torch.manual_seed(0)
    net = DanmulNet(cfg)
    optim = training.OptimConfig()
    optimizer = training.make_optimizer(net, optim)
    batch = {"images": torch.randn(4, 3, 16, 16), "tag_ids": torch.tensor([[1, 5, 6, 2]] * 4),
             "characters": torch.tensor([0, 1, 2, 0]), "tag_targets": torch.zeros(4, 6)}  # fmt: skip
    seen = []
    done = training.train_pass(net, optimizer, itertools.repeat(batch), 7, 10, optim, CurriculumConfig(),
                        on_step=lambda step, logs: seen.append(step))
    assert (done.step, done.samples, seen) == (10, 12, [8, 9, 10])  # from step 7 to the budget of 10
    batches = iter([batch] * 5)
    votes = iter([True, True, False])  # the third step: another worker has run out
    done = training.train_pass(net, optimizer, batches, 0, 100, optim, CurriculumConfig(),
                               agree=lambda has: next(votes))
    assert done.step == 2 and len(done.losses) == 2 and len(list(batches)) == 2  # the rest is left to the caller


@pytest.mark.parametrize("images,workers,batch", [(430, 2, 64), (424, 2, 64), (240, 2, 32), (5_000, 2, 64),
                                                  (97, 1, 64), (107, 2, 64), (1_001, 3, 32), (613, 4, 16),
                                                  (1_280_000, 8, 64)])  # fmt: skip
def test_the_epochs_a_run_counts_are_the_plans(images, workers, batch):
    """The Ray Train loop counts ``group`` epochs per pass over a dataset that repeats the split ``group``
    times and split equally among the workers (Ray Data's ``equal`` split of the pass's rows, a remainder
    dropped), each worker stepping through its share in batches (the last partial one a step too), until the
    budget is spent: its last progress line's epoch is the plan's (it once printed "epoch 240/223")."""
    plan = make_plan(images, batch, workers)
    group = report_group(plan, epochs_given=False)
    plan = replace(plan, epochs_per_pass=group)
    per_pass = -(-(group * images // workers) // plan.batch_size)
    step = epoch = 0
    while step < plan.steps:
        step, epoch = step + per_pass, epoch + group
    assert epoch == plan.epochs and plan.steps_per_pass == per_pass


# -- the input size, chosen from the train images ---------------------------------------------------------


def test_the_input_size_follows_the_images_between_the_presets_size_and_its_largest():
    assert choose_image_size("tiny", 64, 8, [128, 150, 179, 128, 140]).size == MAX_IMAGE_SIZE["tiny"] == 96
    assert choose_image_size("tiny", 64, 8, [64] * 10).size == 64  # the demo's synthetic images
    assert choose_image_size("tiny", 64, 8, [32, 32, 40]).size == 64  # never below the preset's own size
    assert choose_image_size("tiny", 64, 8, [85, 87, 90]).size == 80  # whole patches of 8
    assert choose_image_size("base", 224, 16, [512] * 3).size == 224  # base stays at the paper's size
    chosen = choose_image_size("tiny", 64, 8, [])
    assert chosen.size == 64 and "could be read" in chosen.why
    why = choose_image_size("tiny", 64, 8, [140, 150, 512]).why
    assert "150 px" in why and "96 px at most" in why  # the median, and the cap that applies


def test_a_run_without_image_size_reads_it_from_the_train_images_headers(tmp_path):
    from lookalike import generate

    from ingest.storage import Storage
    from ray_jobs.model_io import input_size_for

    big = Storage(generate(str(tmp_path / "big"), characters=3, images=40, size=128, seed=1))
    small = Storage(generate(str(tmp_path / "small"), characters=3, images=40, size=48, seed=1))
    assert input_size_for(big).size == 96 and "median long side" in input_size_for(big).why
    assert input_size_for(small).size == 64
    pretrained = input_size_for(big, pretrained_image="/weights/vit.safetensors")
    assert pretrained.size == 64 and "pretrained" in pretrained.why  # the weights' position embeddings fix it
    assert input_size_for(big, "base").size == 224


def test_danmul_train_chooses_the_size_keeps_a_given_one_and_a_resumed_runs(tmp_path):
    from lookalike import generate

    from ingest.storage import Storage
    from ray_jobs.config import dump
    from ray_jobs.train import SETTINGS, _log_progress, with_input_size

    data = generate(str(tmp_path / "d"), characters=3, images=40, size=128, seed=1)
    run_dir = Storage(str(tmp_path / "o" / "run"))
    fresh = TrainConfig(data=data, out=str(tmp_path / "o"))
    cfg, line = with_input_size(fresh, Storage(data), run_dir)
    assert cfg.image_size == 96 and line.startswith("input size 96px: ") and "--image-size" in line
    given = replace(fresh, image_size=48)
    assert with_input_size(given, Storage(data), run_dir) == (given, None)
    for wrong in (0, -64, 15, 1025, "96", 96.5, True):
        with pytest.raises(ValueError, match="--image-size must be a whole number of px from 16 to 1024"):
            replace(fresh, image_size=wrong)

    # a run that trained an epoch at 64 px (its settings from before the size was chosen: null) resumes at 64
    run_dir.write_text(SETTINGS, dump(replace(fresh, image_size=None)))
    assert with_input_size(fresh, Storage(data), run_dir)[0].image_size == 96  # no epoch ended: nothing to resume
    _log_progress(run_dir, {"event": "end", "epoch": 1})
    cfg, line = with_input_size(fresh, Storage(data), run_dir)
    assert cfg.image_size == 64 and "resumed" in line
    assert with_input_size(replace(fresh, image_size=64), Storage(data), run_dir)[0].image_size == 64
    with pytest.raises(ValueError, match="trained at 64 px: resume it with --image-size 64"):
        with_input_size(replace(fresh, image_size=96), Storage(data), run_dir)
    for hostile in ("image_size: [", "- a list", "image_size: abc", "image_size: .inf", "image_size: -5",
                    "image_size: true", "preset: huge", "[" * 10_000):
        run_dir.write_text(SETTINGS, hostile)
        with pytest.raises(ValueError, match=r"danmul-train\.yaml") as refused:
            with_input_size(fresh, Storage(data), run_dir)
        assert "\n" not in str(refused.value)  # one line for the console

    # killed after Ray saved a checkpoint but before the epoch's end was logged: still a resume
    other = Storage(str(tmp_path / "o" / "other"))
    other.write_text(SETTINGS, dump(replace(fresh, image_size=64)))
    other.write_text("checkpoint_2026-12-04_01-54-58.810961/model.safetensors", "weights")
    assert with_input_size(fresh, Storage(data), other)[0].image_size == 64
    other.write_text("progress.jsonl", "not json\n")
    with pytest.raises(ValueError, match=r"progress\.jsonl: line 1 is not JSON"):
        with_input_size(fresh, Storage(data), other)


def _shard(path, images: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ingest.schema import SHARD_SCHEMA

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"post_id": i, "image": image, "character": "a", "tags": [], "copyright": [], "rating": "g"}
            for i, image in enumerate(images)]
    pq.write_table(pa.Table.from_pylist(rows, SHARD_SCHEMA), path)


def test_unreadable_train_images_are_left_out_of_the_sample(tmp_path):
    import io

    from PIL import Image

    from ingest.storage import Storage
    from ray_jobs.model_io import input_size_for

    png = io.BytesIO()
    Image.new("RGB", (128, 128)).save(png, "PNG")
    junk = [b"not an image", b"", b"\x89PNG\r\n\x1a\n" + bytes(30)]
    # another tool's shard names, a broken dataset.json: the shards are those training reads
    _shard(tmp_path / "junk" / "train" / "train-00000.parquet", junk * 7)
    (tmp_path / "junk" / "dataset.json").write_text("{")
    chosen = input_size_for(Storage(str(tmp_path / "junk")))
    assert chosen.size == 64 and "could be read" in chosen.why
    _shard(tmp_path / "one" / "train" / "train-00000.parquet", junk * 7 + [png.getvalue()])
    assert input_size_for(Storage(str(tmp_path / "one"))).size == 96  # the one image readable decides


def test_the_size_sample_reads_no_oversized_row_group(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from ingest.shards import sample_column
    from ingest.storage import Storage
    from ray_jobs.train_data import split_shards

    data = Storage(generate_lookalike(tmp_path, size=128))
    shards = [f"train/{f.path}" for f in split_shards(data, "train")]
    assert len(list(sample_column(data, shards, "image", 10))) == 10
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **k: read.append(a) or real(self, *a, **k))
    assert list(sample_column(data, shards, "image", 10, max_chunk_bytes=1024)) == [] and not read
    # the builder's own row groups (up to 64 MiB of images and one more) are read
    from ingest.shards import ROW_GROUP_BYTES, SAMPLE_CHUNK_BYTES
    from model.preprocess import MAX_IMAGE_BYTES

    assert SAMPLE_CHUNK_BYTES > ROW_GROUP_BYTES + MAX_IMAGE_BYTES
    opened = []
    real_path = Storage.path
    monkeypatch.setattr(Storage, "path", lambda self, rel="": opened.append(rel) or real_path(self, rel))
    assert list(sample_column(data, shards * 20, "image", 10_000, max_groups=3)) and len(opened) <= 3


def generate_lookalike(tmp_path, size: int) -> str:
    from lookalike import generate

    return generate(str(tmp_path / "d"), characters=3, images=40, size=size, seed=1)
