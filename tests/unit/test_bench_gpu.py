"""``danmul bench gpu``'s own machinery: a part that hangs is killed at its limit and one that fails says so,
each as a JSON line, and the run goes on; ratios are filled from earlier figures. (The whole quick run is
``tests/test_cli.py``'s.)"""

from __future__ import annotations

import argparse
import json

import pytest

from ray_jobs import bench_gpu


def args_for(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_gpu.add_arguments(p)
    return bench_gpu.settle(p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()] + ["--quick"]))


def test_a_part_that_runs_over_its_limit_is_killed_and_says_so(tmp_path):
    lines = list(bench_gpu.run_child("inference", args_for(), str(tmp_path), "tiny", limit=0.5))
    assert lines == [{"figure": "inference", "error": "timed out after 0 s (killed); figures before this line stand"}]


def test_a_part_that_fails_prints_an_error_line_and_exits_cleanly(tmp_path):
    """No prepared images in the work folder: the part's exception becomes its JSON line."""
    lines = list(bench_gpu.run_child("decode", args_for(), str(tmp_path), "tiny", limit=120))
    assert [line["figure"] for line in lines] == ["decode"] and "FileNotFoundError" in lines[0]["error"]
    assert {"gpu", "torch", "cuda"} <= set(lines[0])


def test_parts_past_the_budget_are_skipped_by_name(capsys):
    assert bench_gpu.run(args_for(budget_s=5, parts="env,inference")) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [(line["figure"], "skipped" in line) for line in lines] == [("env", True), ("prepare", True),
                                                                        ("inference", True)]
    assert "budget of 5 s is spent" in lines[0]["skipped"]


def test_an_unknown_part_is_refused():
    assert bench_gpu.run(args_for(parts="env,warp")) == 2


@pytest.mark.parametrize("figures,line,ratio", [
    ({"bare": 200.0}, {"figure": "x", "value": 150.0, "ratio_to": "bare", "ratio": None}, 0.75),
    ({}, {"figure": "x", "value": 150.0, "ratio_to": "bare", "ratio": None}, None),  # no such figure: no ratio
    ({"bare": 200.0}, {"figure": "x", "value": 150.0, "ratio_to": "bare", "ratio": 0.5}, 0.5),  # the part's own
])  # fmt: skip
def test_ratios_are_filled_from_earlier_figures(capsys, figures, line, ratio):
    bench_gpu.emit(line, figures)
    assert json.loads(capsys.readouterr().out)["ratio"] == ratio and figures["x"] == 150.0
