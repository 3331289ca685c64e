"""Magnitude masks and structured neuron selection (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from recserve.converters.prune import magnitude_masks, neurons_to_keep

W1 = np.array([[-1.0, 2.0], [-3.0, 4.0]])
W2 = np.array([[10.0, -20.0, 30.0, -40.0, 50.0, -60.0]])


def test_global_masks_prune_smallest_over_all_layers() -> None:
    m1, m2 = magnitude_masks([W1, W2], 0.5, "global")
    assert m1.shape == W1.shape and m2.shape == W2.shape
    # 10 weights, 5 removed: the four of W1 and |10| of W2
    assert int((~m1).sum() + (~m2).sum()) == 5
    assert not m1.any()
    assert m2.tolist() == [[False, True, True, True, True, True]]


def test_layer_masks_prune_each_layer_alone() -> None:
    m1, m2 = magnitude_masks([W1, W2], 0.5, "layer")
    assert m1.tolist() == [[False, False], [True, True]]  # |-1|, |2| gone; |-3|, |4| kept
    assert m2.tolist() == [[False, False, False, True, True, True]]


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.75, 0.9])
def test_mask_counts_are_exact(scope: str, sparsity: float) -> None:
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(7, 13)), rng.normal(size=(5, 3)), rng.normal(size=(40,))]
    masks = magnitude_masks(weights, sparsity, scope)
    if scope == "global":
        total = sum(w.size for w in weights)
        assert sum(int((~m).sum()) for m in masks) == int(total * sparsity)
        # nothing kept is smaller than anything removed
        kept = np.concatenate([np.abs(w[m]) for w, m in zip(weights, masks)])
        removed = np.concatenate([np.abs(w[~m]) for w, m in zip(weights, masks)])
        assert kept.min() > removed.max()
    else:
        for w, m in zip(weights, masks):
            assert int((~m).sum()) == int(w.size * sparsity)
            assert np.abs(w[m]).min() > np.abs(w[~m]).max()


def test_tiny_sparsity_keeps_everything() -> None:
    masks = magnitude_masks([W1], 0.1, "layer")  # int(4 * 0.1) == 0 weights to remove
    assert masks[0].all()


def test_neurons_to_keep_largest_norm_rows_sorted() -> None:
    w = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 0.5], [2.0, 0.0]])
    # squared norms 0, 25, 1, 0.25, 4 -> the two largest are rows 1 and 4
    assert neurons_to_keep(w, None, 0.6).tolist() == [1, 4]
    # a large bias makes row 3 the largest
    bias = np.array([0.0, 0.0, 0.0, 10.0, 0.0])
    assert neurons_to_keep(w, bias, 0.6).tolist() == [1, 3]
    assert neurons_to_keep(w, bias, 0.2).tolist() == [1, 2, 3, 4]


def test_neurons_to_keep_keeps_at_least_one() -> None:
    w = np.array([[1.0], [5.0], [2.0]])
    assert neurons_to_keep(w, None, 0.99).tolist() == [1]
