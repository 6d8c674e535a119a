"""Backfill settings an operator can get wrong are refused with the flag's name, before any Ray starts."""

from __future__ import annotations

import pytest

from ray_jobs.backfill import BackfillConfig, run


@pytest.mark.parametrize("field,value,message", [("batch_size", 0, "--batch-size must be at least 1, not 0"),
                                                 ("batch_size", -64, "--batch-size must be at least 1"),
                                                 ("actors", -1, "--actors must be at least 0, not -1"),
                                                 ("limit", -5, "--limit must be at least 0")])  # fmt: skip
def test_impossible_sizes_are_refused_by_name(tmp_path, field, value, message):
    cfg = BackfillConfig(input=str(tmp_path), checkpoint=str(tmp_path), out=str(tmp_path / "out"), **{field: value})
    with pytest.raises(ValueError, match=message):
        run(cfg, log=lambda line: None)
    assert not (tmp_path / "out").exists()  # refused before anything was written
