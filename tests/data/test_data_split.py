"""Train/validation split: stratified by kind, whole groups, seeded, stable on re-runs."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from nucleiseg.data.split import read_groups, split_train_val
from nucleiseg.errors import NucleisegError


def _synthetic(seed=0, n_groups=(150, 25, 4), standalone=(300, 40, 2)):
    """Kinds in DSB-like proportions: mosaic groups of 1-6 tiles plus standalone images."""
    rng = np.random.default_rng(seed)
    kinds, groups = [], []
    for kind, n_g, n_alone in zip(("fluorescence", "tissue", "brightfield"), n_groups, standalone):
        for g in range(n_g):
            size = int(rng.integers(1, 7))
            kinds += [kind] * size
            groups += [f"{kind}-g{g}"] * size
        kinds += [kind] * n_alone
        groups += [None] * n_alone
    return kinds, groups


def _sides_per_group(groups, split):
    sides = defaultdict(set)
    for g, s in zip(groups, split):
        if g:
            sides[g].add(s)
    return sides


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_never_straddle_and_fractions_near_target(seed):
    kinds, groups = _synthetic(seed)
    split = split_train_val(kinds, groups, val_fraction=0.1, seed=seed)
    assert all(len(s) == 1 for s in _sides_per_group(groups, split).values())
    kinds = np.array(kinds)
    for kind in ("fluorescence", "tissue"):
        share = np.mean(split[kinds == kind] == "val")
        assert abs(share - 0.1) < 0.02, (kind, share)
    assert 1 <= np.sum(split[kinds == "brightfield"] == "val") <= 4


def test_seeded_and_seed_matters():
    kinds, groups = _synthetic()
    a = split_train_val(kinds, groups, seed=5)
    np.testing.assert_array_equal(a, split_train_val(kinds, groups, seed=5))
    assert not np.array_equal(a, split_train_val(kinds, groups, seed=6))


def test_every_kind_with_two_groups_gets_validation():
    kinds = ["fluorescence"] * 50 + ["tissue"] * 3 + ["brightfield"] * 2 + ["odd"]
    groups = [None] * 50 + ["t", "t", None] + [None, None] + [None]
    split = split_train_val(kinds, groups, val_fraction=0.1, seed=0)
    kinds = np.array(kinds)
    for kind in ("fluorescence", "tissue", "brightfield"):
        assert (split[kinds == kind] == "val").any(), kind
        assert (split[kinds == kind] == "train").any(), kind
    assert split[-1] == "train"  # a kind with a single image keeps it for training


def test_fixed_assignments_kept_and_new_images_join_their_group():
    kinds, groups = _synthetic()
    first = split_train_val(kinds, groups, seed=0)
    # add images: one to an existing validation group, and new standalone ones
    val_group = next(g for g, s in zip(groups, first) if g and s == "val")
    kinds2 = kinds + ["fluorescence"] * 21
    groups2 = groups + [val_group] + [None] * 20
    fixed = list(first) + [None] * 21
    second = split_train_val(kinds2, groups2, seed=0, fixed=fixed)
    np.testing.assert_array_equal(second[: len(first)], first)
    assert second[len(first)] == "val"
    assert all(len(s) == 1 for s in _sides_per_group(groups2, second).values())


def test_zero_fraction_and_bad_arguments():
    assert set(split_train_val(["a"] * 5, [None] * 5, val_fraction=0.0)) == {"train"}
    with pytest.raises(ValueError):
        split_train_val(["a"], [None], val_fraction=1.0)
    with pytest.raises(ValueError):
        split_train_val(["a", "b"], [None])


def test_read_groups(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("ImageId,mosaic_group\na,m1\nb,\nc,m1\n")
    assert read_groups(path) == {"a": "m1", "c": "m1"}
    path.write_text("ImageId,group\na,m1\n")
    with pytest.raises(NucleisegError, match="mosaic_group"):
        read_groups(path)
    with pytest.raises(NucleisegError, match="not found"):
        read_groups(tmp_path / "nope.csv")
