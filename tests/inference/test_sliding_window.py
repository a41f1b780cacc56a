"""Sliding-window evaluation: coverage, exactness for pointwise functions, padding, weights."""
from __future__ import annotations

import pytest
import torch

from nndiff.inference.sliding_window import (
    gaussian_importance,
    sliding_window,
    sliding_window_model,
    window_starts,
)


def test_window_starts_cover_with_bounded_steps():
    assert window_starts(8, 8) == [0]
    assert window_starts(5, 8) == [0]
    assert window_starts(16, 8) == [0, 4, 8]
    for size, patch in ((17, 8), (23, 6), (40, 12)):
        starts = window_starts(size, patch, 0.5)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert max(b - a for a, b in zip(starts, starts[1:])) <= patch * 0.5


def test_gaussian_importance_is_centred_positive_and_max_one():
    w = gaussian_importance((5, 8))
    assert w.shape == (5, 8)
    assert torch.isclose(w.max(), torch.tensor(1.0)) and (w > 0).all()
    assert w[2, 3] == w[2, 4] and w[2, 3] > w[0, 0]
    assert torch.allclose(w, w.flip(0).flip(1))


@pytest.mark.parametrize("shape, patch", [((1, 2, 13, 17), (8, 8)), ((2, 1, 5, 9, 11), (4, 8, 8)),
                                          ((1, 1, 6, 6), (8, 8)), ((1, 1, 8, 8), (8, 8))])
def test_pointwise_function_is_reproduced_exactly(shape, patch):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    calls = []

    def fn(window):
        calls.append(tuple(window.shape[2:]))
        return torch.cat([window * 2 + 1, -window], dim=1)

    out = sliding_window(fn, x, patch)
    assert out.shape == (shape[0], 2 * shape[1], *shape[2:])
    torch.testing.assert_close(out, torch.cat([x * 2 + 1, -x], dim=1), atol=1e-5, rtol=1e-5)
    assert all(c == tuple(patch) for c in calls)
    if tuple(shape[2:]) == tuple(patch):
        assert len(calls) == 1


def test_overlaps_are_weighted_averages():
    # fn outputs its window's start index: each voxel gets a convex combination of the starts of
    # the windows that cover it, so values stay within [min, max] of those starts
    x = torch.zeros(1, 1, 1, 16)
    starts = iter(window_starts(16, 8))

    def fn(window):
        return torch.full_like(window, float(next(starts)))

    out = sliding_window(fn, x, (1, 8), gaussian=False)
    expected = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 6, 6, 6, 6, 8, 8, 8, 8], dtype=torch.float32)
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_model_windows_cond_image_and_passes_other_conditions():
    x = torch.randn(1, 1, 12, 20, generator=torch.Generator().manual_seed(1))
    image = torch.randn(1, 1, 12, 20, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3.0])

    def model(window, t_, cond):
        assert cond["cond_image"].shape == window.shape and cond["class_labels"].tolist() == [4]
        return window + cond["cond_image"] * t_.view(-1, 1, 1, 1)

    windowed = sliding_window_model(model, (8, 8))
    out = windowed(x, t, {"cond_image": image, "class_labels": torch.tensor([4])})
    torch.testing.assert_close(out, x + 3 * image, atol=1e-5, rtol=1e-5)
