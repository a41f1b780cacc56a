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


@pytest.mark.parametrize("max_batch, expected_calls", [(None, 8), (2, 8), (4, 4), (8, 2), (12, 2), (100, 1)])
def test_stacked_windows_give_the_same_output_with_fewer_calls(max_batch, expected_calls):
    """Windows stacked along the batch axis (per-item times and labels repeated with them) give the
    one-window-per-call result; calls = ceil(windows / (max_batch // B)). 12x20 with an 8x8 patch
    and half-patch steps is 2 x 4 = 8 windows, B = 2."""
    x = torch.randn(2, 1, 12, 20, generator=torch.Generator().manual_seed(1))
    image = torch.randn(2, 1, 12, 20, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3.0, 5.0])
    labels = torch.tensor([4, 7])
    batches: list[int] = []

    def model(window, t_, cond):  # per-item and position-dependent: a wrong repeat order shows
        batches.append(window.shape[0])
        assert t_.shape[0] == window.shape[0] == cond["class_labels"].shape[0] == cond["cond_image"].shape[0]
        ramp = torch.linspace(0, 1, window.shape[-1])
        return window * t_.view(-1, 1, 1, 1) + cond["cond_image"] * ramp + cond["class_labels"].view(-1, 1, 1, 1)

    reference = sliding_window_model(model, (8, 8))(x, t, {"cond_image": image, "class_labels": labels})
    batches.clear()
    out = sliding_window_model(model, (8, 8), max_batch=max_batch)(x, t, {"cond_image": image, "class_labels": labels})
    torch.testing.assert_close(out, reference)
    assert len(batches) == expected_calls and max(batches) <= max(max_batch or 2, 2) and sum(batches) == 8 * 2


def test_windows_per_call_must_be_positive():
    with pytest.raises(ValueError, match="windows_per_call must be >= 1"):
        sliding_window(lambda w: w, torch.zeros(1, 1, 8, 8), (4, 4), windows_per_call=0)
