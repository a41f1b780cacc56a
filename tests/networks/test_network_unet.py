"""UNet behaviour: shapes (2D, 3D, anisotropic), attention, conditioning, gradients, bf16, compile."""
from __future__ import annotations

import math

import pytest
import torch

from nndiff.networks import build_network, count_parameters
from nndiff.networks.layers import AttentionBlock, timestep_embedding

SHAPE_CASES = [
    # (overrides, input spatial size, expected shape_divisor)
    ({}, (24, 20), (4, 4)),  # odd (6 x 5) at the deepest level
    ({"strides": [[1, 2], [2, 2]]}, (6, 12), (2, 4)),  # anisotropic 2D
    ({"spatial_dims": 3, "strides": [[1, 2, 2], [2, 2, 2]]}, (4, 12, 20), (2, 4, 4)),  # deepest 2 x 3 x 5
    ({"spatial_dims": 3, "strides": [[2, 2, 2]], "channel_mult": [1, 2], "attention_levels": [0]}, (6, 6, 10), (2, 2, 2)),
]


@pytest.mark.parametrize("override,spatial,divisor", SHAPE_CASES)
def test_output_shape_equals_input_shape(make_block, perturb, override, spatial, divisor):
    model = build_network(make_block(in_channels=2, out_channels=3, **override))
    perturb(model)
    assert model.shape_divisor == divisor
    x = torch.randn(2, 2, *spatial)
    out = model(x, torch.tensor([1.0, 900.0]))
    assert out.shape == (2, 3, *spatial)
    assert torch.isfinite(out).all()


def test_indivisible_input_size_is_rejected(make_block):
    model = build_network(make_block())
    with pytest.raises(ValueError, match=r"not divisible by \(4, 4\)"):
        model(torch.randn(1, 1, 22, 20), torch.zeros(1))


def test_output_is_zero_at_initialisation(make_block):
    # Zero-initialised output conv: the untrained network predicts exactly 0.
    model = build_network(make_block())
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 4.0]))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("levels,res_blocks,expected", [
    ([], 2, 0),
    ([0], 2, 2 + 3),  # encoder + decoder blocks of level 0, no middle attention
    ([1, 2], 2, (2 + 3) * 2 + 1),  # + the middle block at the deepest level
    ([2], 1, 1 + 2 + 1),
])
def test_attention_modules_exist_exactly_at_planned_levels(make_block, levels, res_blocks, expected):
    model = build_network(make_block(attention_levels=levels, num_res_blocks=res_blocks))
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == expected
    channels = model.config.level_channels
    assert {b.num_heads * b.head_dim for b in blocks} <= {channels[level] for level in levels}


@pytest.mark.parametrize("spatial", [(4, 6), (2, 3, 4)])
def test_attention_block_matches_naive_softmax_attention(spatial):
    channels, head_channels = 12, 4
    block = AttentionBlock(channels, head_channels, norm_groups=3).double()
    torch.nn.init.normal_(block.proj.weight)  # undo the zero init so the attention path shows
    x = torch.randn(2, channels, *spatial, dtype=torch.float64)

    tokens = block.norm(x).reshape(2, channels, -1).transpose(1, 2)  # (B, N, C)
    q, k, v = (tokens @ block.qkv.weight.T + block.qkv.bias).split(channels, dim=-1)
    heads = []
    for h in range(channels // head_channels):
        sl = slice(h * head_channels, (h + 1) * head_channels)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(head_channels), dim=-1)
        heads.append(weights @ v[..., sl])
    attended = torch.cat(heads, dim=-1) @ block.proj.weight.T + block.proj.bias
    expected = x + attended.transpose(1, 2).reshape(x.shape)

    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 7)
    assert emb.shape == (2, 7)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0]))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1, :3], torch.cos(10 * freqs))
    torch.testing.assert_close(emb[1, 3:6], torch.sin(10 * freqs))


def _conditioned(make_block, perturb):
    model = build_network(make_block(cond_channels=2, num_classes=3, num_continuous_conditions=2), seed=0)
    assert perturb(model) > 0
    inputs = {
        "x": torch.randn(2, 1, 8, 12),
        "t": torch.tensor([10.0, 500.0]),
        "cond_image": torch.randn(2, 2, 8, 12),
        "class_labels": torch.tensor([0, 2]),
        "continuous": torch.tensor([[0.5, -1.0], [2.0, 0.0]]),
    }
    return model, inputs


@pytest.mark.parametrize("name,change", [
    ("t", lambda v: v + 50.0),
    ("cond_image", lambda v: v + torch.randn_like(v)),
    ("class_labels", lambda v: (v + 1) % 3),
    ("continuous", lambda v: v + 1.0),
])
def test_each_conditioning_path_changes_every_sample(make_block, perturb, name, change):
    model, inputs = _conditioned(make_block, perturb)
    base = model(**inputs)
    changed = model(**{**inputs, name: change(inputs[name])})
    per_sample_change = (changed - base).abs().flatten(1).amax(dim=1)
    assert (per_sample_change > 1e-4).all(), per_sample_change


def test_gradient_reaches_every_parameter(make_block, perturb):
    model, inputs = _conditioned(make_block, perturb)
    model.train()
    # Sample 1 takes the null class token and the null metadata embedding, sample 0 the real ones.
    inputs["class_labels"] = torch.tensor([1, -1])
    inputs["continuous"] = torch.tensor([[0.5, -1.0], [float("nan"), 0.0]])
    model(**inputs).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("override,spatial", [
    ({"num_classes": 2}, (16, 12)),
    ({"spatial_dims": 3, "strides": [[1, 2, 2], [2, 2, 2]]}, (4, 8, 8)),
])
def test_bf16_autocast_forward_on_cpu_is_finite_and_close(make_block, perturb, override, spatial):
    model = build_network(make_block(**override))
    perturb(model)
    x, t = torch.randn(2, 1, *spatial), torch.tensor([5.0, 700.0])
    reference = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # bf16 rounds each layer's output by up to 2^-8 (0.4 %); through ~20 layers the measured
    # relative error is about 1.2 % (2D and 3D); 5 % leaves room for platform differences.
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 5e-2, rel


def test_torch_compile_traces_one_graph_without_breaks(make_block, perturb):
    torch._dynamo.reset()
    model, inputs = _conditioned(make_block, perturb)
    # fullgraph=True raises on any graph break; the eager backend keeps the test fast on CPU.
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(**inputs), model(**inputs))
    no_conditions = {k: inputs[k] for k in ("x", "t", "cond_image")}
    torch.testing.assert_close(compiled(**no_conditions), model(**no_conditions))


def test_input_errors_are_explicit(make_block):
    model = build_network(make_block(cond_channels=1))
    x, t = torch.randn(1, 1, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match="expects a conditioning image"):
        model(x, t)
    with pytest.raises(ValueError, match="cond_image must have shape"):
        model(x, t, cond_image=torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="network is unconditional"):
        model(x, t, cond_image=x, class_labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 2 spatial sizes\)"):
        model(torch.randn(1, 2, 8, 8), t, cond_image=x)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, torch.zeros(3), cond_image=x)


def test_scalar_time_is_broadcast(make_block, perturb):
    model = build_network(make_block())
    perturb(model)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x, torch.tensor(42.0)), model(x, torch.full((2,), 42.0)))
    assert not torch.allclose(model(x, torch.tensor(42.0)), model(x, torch.tensor(43.0)))


def test_dropout_is_active_only_in_training(make_block, perturb):
    model = build_network(make_block(dropout=0.5))
    perturb(model)
    x, t = torch.randn(1, 1, 8, 8), torch.zeros(1)
    model.eval()
    torch.testing.assert_close(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))
