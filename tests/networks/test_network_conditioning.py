"""Learned null tokens for classifier-free guidance and the condition-dropping helper."""
from __future__ import annotations

import pytest
import torch

from nndiff.networks import NULL_LABEL, build_network, drop_conditions

NAN = float("nan")


@pytest.fixture
def conditioned(make_block, perturb):
    model = build_network(make_block(num_classes=3, num_continuous_conditions=2), seed=1)
    perturb(model)
    return model.eval(), torch.randn(2, 1, 8, 8), torch.tensor([100.0, 100.0])


def test_missing_dropped_and_explicit_null_labels_are_the_same_token(conditioned):
    model, x, t = conditioned
    meta = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    missing = model(x, t, class_labels=None, continuous=meta)
    explicit_index = model(x, t, class_labels=torch.tensor([3, 3]), continuous=meta)
    alias = model(x, t, class_labels=torch.tensor([NULL_LABEL, NULL_LABEL]), continuous=meta)
    dropped, _ = drop_conditions(torch.tensor([0, 1]), None, p=1.0)
    via_drop = model(x, t, class_labels=dropped, continuous=meta)
    assert torch.equal(missing, explicit_index)
    assert torch.equal(missing, alias)
    assert torch.equal(missing, via_drop)
    real = model(x, t, class_labels=torch.tensor([0, 0]), continuous=meta)
    assert not torch.allclose(missing, real)


def test_missing_and_nan_metadata_select_the_null_embedding(conditioned):
    model, x, t = conditioned
    labels = torch.tensor([0, 2])
    missing = model(x, t, class_labels=labels, continuous=None)
    nan_rows = model(x, t, class_labels=labels, continuous=torch.full((2, 2), NAN))
    assert torch.equal(missing, nan_rows)
    assert torch.isfinite(missing).all()
    real = model(x, t, class_labels=labels, continuous=torch.zeros(2, 2))
    assert not torch.allclose(missing, real)


def test_null_selection_is_per_sample(conditioned):
    model, x, t = conditioned
    labels, meta = torch.tensor([1, 2]), torch.tensor([[0.3, 0.7], [1.5, -2.0]])
    full = model(x, t, class_labels=labels, continuous=meta)
    mixed = model(x, t, class_labels=torch.tensor([1, NULL_LABEL]), continuous=torch.tensor([[0.3, 0.7], [NAN, -2.0]]))
    null = model(x, t)
    # GroupNorm and attention act within a sample, so each sample's output depends on its own inputs only.
    torch.testing.assert_close(mixed[0], full[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], null[1], rtol=0, atol=1e-6)
    assert not torch.allclose(mixed[1], full[1])


def test_drop_conditions_drops_label_and_metadata_together():
    labels = torch.arange(1000) % 3
    meta = torch.randn(1000, 2)
    generator = torch.Generator().manual_seed(0)
    new_labels, new_meta = drop_conditions(labels, meta, p=0.3, generator=generator)
    dropped = new_labels == NULL_LABEL
    assert torch.equal(dropped, torch.isnan(new_meta).all(dim=1))
    assert torch.equal(new_labels[~dropped], labels[~dropped])
    assert torch.equal(new_meta[~dropped], meta[~dropped])
    assert not torch.isnan(meta).any() and labels.min() >= 0  # inputs untouched
    # Binomial(1000, 0.3): sd = 14.5; 5 sd = 72.
    assert abs(int(dropped.sum()) - 300) < 72


def test_drop_conditions_edge_cases():
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(drop_conditions(labels, None, p=0.0)[0], labels)
    assert torch.equal(drop_conditions(labels, None, p=1.0)[0], torch.full((3,), NULL_LABEL))
    assert torch.isnan(drop_conditions(None, torch.zeros(3, 1), p=1.0)[1]).all()
    assert drop_conditions(None, None, p=0.5) == (None, None)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        drop_conditions(labels, None, p=1.5)


def test_drop_conditions_is_reproducible_with_a_generator():
    labels = torch.zeros(64, dtype=torch.long)
    a = drop_conditions(labels, None, 0.5, torch.Generator().manual_seed(5))[0]
    b = drop_conditions(labels, None, 0.5, torch.Generator().manual_seed(5))[0]
    c = drop_conditions(labels, None, 0.5, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_condition_shapes_are_checked(conditioned):
    model, x, t = conditioned
    with pytest.raises(ValueError, match=r"class_labels must have shape \(2,\)"):
        model(x, t, class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"continuous must have shape \(2, 2\)"):
        model(x, t, continuous=torch.zeros(2, 3))
