"""Per-class train/val/test splits: exact sizes, every class in train, deterministic for a seed."""

from collections import Counter

import pytest

from ingest.shards import SplitAssigner, parse_fractions, split_sizes


@pytest.mark.parametrize("n", [1, 2, 3, 9, 10, 11, 37, 100, 1001])
def test_split_sizes_sum_and_keep_train(n):
    tr, va, te = split_sizes(n, (0.8, 0.1, 0.1))
    assert tr + va + te == n
    assert tr >= 1
    if n >= 10:
        assert va == round(n * 0.1) and te == round(n * 0.1)


def test_split_sizes_train_survives_extreme_fractions():
    assert split_sizes(2, (0.1, 0.45, 0.45))[0] == 1
    assert split_sizes(1, (0.2, 0.4, 0.4)) == (1, 0, 0)


def _assign(totals: dict[str, int], seed: int) -> dict[int, str]:
    assigner = SplitAssigner(totals, (0.8, 0.1, 0.1), seed)
    out = {}
    post_id = 0
    # interleave classes the way a metadata dump would
    remaining = dict(totals)
    while any(remaining.values()):
        for c in totals:
            if remaining[c]:
                post_id += 1
                out[post_id] = (c, assigner.assign(c, post_id))
                remaining[c] -= 1
    return out


def test_exact_sizes_per_class_and_train_always_present():
    totals = {"a": 10, "b": 57, "c": 200, "d": 13}
    result = _assign(totals, seed=0)
    per = Counter(result.values())
    for c, n in totals.items():
        want = split_sizes(n, (0.8, 0.1, 0.1))
        assert (per[(c, "train")], per[(c, "val")], per[(c, "test")]) == want


def test_deterministic_for_a_seed_and_different_across_seeds():
    totals = {"a": 50, "b": 80}
    assert _assign(totals, 1) == _assign(totals, 1)
    assert _assign(totals, 1) != _assign(totals, 2)


def test_more_posts_than_declared_is_an_error():
    assigner = SplitAssigner({"a": 1}, (0.8, 0.1, 0.1), 0)
    assigner.assign("a", 1)
    with pytest.raises(ValueError, match="more posts"):
        assigner.assign("a", 2)


@pytest.mark.parametrize("bad", ["0.8,0.1", "0.5,0.5,0.5", "0,0.5,0.5", "a,b,c", "-0.1,0.6,0.5"])
def test_bad_fractions(bad):
    with pytest.raises(ValueError):
        parse_fractions(bad)
