"""Backfill settings an operator can get wrong: impossible sizes are refused with the flag's name before any Ray
starts, and a pool of predictors that leaves no CPU for decoding is named before the job waits on it."""

from __future__ import annotations

import pytest

from ray_jobs.backfill import BackfillConfig, cpu_shortfall, run


@pytest.mark.parametrize("field,value,message", [("batch_size", 0, "--batch-size must be at least 1, not 0"),
                                                 ("batch_size", -64, "--batch-size must be at least 1"),
                                                 ("actors", -1, "--actors must be at least 0, not -1"),
                                                 ("limit", -5, "--limit must be at least 0")])  # fmt: skip
def test_impossible_sizes_are_refused_by_name(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        run(BackfillConfig(input=str(tmp_path), checkpoint=str(tmp_path), out=str(tmp_path / "out"), **{field: value}),
            log=lambda line: None)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_predictors_that_hold_every_cpu_are_named_before_the_job_waits():
    # 2 predictors of 1 CPU and decode tasks of 0.5 on a 2-CPU cluster: decoding never gets a CPU
    warning = cpu_shortfall(2, 1, 0.5, 2)
    assert "need 2.5 CPUs; the cluster has 2" in warning and "at most 1)" in warning
    assert cpu_shortfall(1, 1, 0.5, 2) is None  # the default on 2 CPUs: one predictor, room to decode
    assert cpu_shortfall(8, 0, 0.5, 4) is None  # predictors on GPUs hold no CPU
    assert "at most 0)" in cpu_shortfall(1, 1, 0.5, 1)  # one CPU in all: no predictor fits beside decoding
