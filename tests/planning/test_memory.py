"""The training-memory estimate: attention is quadratic in tokens, every part is counted."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from nndiff.planning.memory import (
    DEFAULT_MEMORY_MODEL,
    GIB,
    attention_score_bytes,
    count_parameters,
    estimate_training_vram,
    estimate_training_vram_gib,
    unet_layout,
)


def _net(dims: int = 2, attention=(2,), levels: int = 3, **kw) -> dict:
    net = {"architecture": "unet", "spatial_dims": dims, "in_channels": 1, "cond_channels": 0, "out_channels": 1,
           "model_channels": 32, "channel_mult": [1, 2, 4][:levels], "strides": [[2] * dims] * (levels - 1),
           "num_res_blocks": 2, "attention_levels": list(attention), "num_head_channels": 32, "norm_groups": 32,
           "dropout": 0.0, "num_classes": None, "num_continuous_conditions": 0}
    net.update(kw)
    return net


def test_attention_score_memory_is_quadratic_in_tokens():
    net = _net(attention=(2,))
    small = estimate_training_vram(net, [64, 64], 2)  # level 2: 16×16 = 256 tokens
    large = estimate_training_vram(net, [128, 128], 2)  # level 2: 32×32 = 1024 tokens (×4)
    assert large.attention_scores_gib / small.attention_scores_gib == pytest.approx(16.0, rel=1e-12)
    # conv feature maps grow linearly with the voxels (time embeddings do not depend on them)
    linear_small = small.activations_gib - small.attention_scores_gib - small.time_embedding_gib
    linear_large = large.activations_gib - large.attention_scores_gib - large.time_embedding_gib
    assert linear_large / linear_small == pytest.approx(4.0, rel=1e-9)
    assert attention_score_bytes(2048, 4) / attention_score_bytes(1024, 4) == pytest.approx(4.0)
    # 2 encoder + 3 decoder + 1 middle attention layers at level 2, 128 channels → 4 heads, 2 samples
    per_layer = DEFAULT_MEMORY_MODEL.attention_score_copies * 2 * 4 * 1024**2
    expected = 6 * 2 * per_layer * DEFAULT_MEMORY_MODEL.allocator_factor / GIB
    assert large.attention_scores_gib == pytest.approx(expected * DEFAULT_MEMORY_MODEL.activation_scale_2d,
                                                       rel=1e-12)


def test_activation_scale_multiplies_activations_only_per_dimensionality():
    eager = dataclasses.replace(DEFAULT_MEMORY_MODEL, activation_scale_2d=1.0, activation_scale_3d=1.0)
    half_3d = dataclasses.replace(eager, activation_scale_3d=0.5)
    net2, net3 = _net(), _net(dims=3)
    a, b = estimate_training_vram(net3, [32, 32, 32], 2, model=eager), estimate_training_vram(
        net3, [32, 32, 32], 2, model=half_3d)
    assert b.activations_gib == pytest.approx(0.5 * a.activations_gib, rel=1e-12)
    assert b.static_gib == a.static_gib and b.workspace_gib == a.workspace_gib
    # the 2D estimate is untouched by the 3D scale
    assert estimate_training_vram(net2, [64, 64], 2, model=half_3d) == estimate_training_vram(
        net2, [64, 64], 2, model=eager)
    # the calibrated default (torch.compile keeps fewer tensors than eager) is below 1
    assert 0 < DEFAULT_MEMORY_MODEL.activation_scale_2d < 1 and 0 < DEFAULT_MEMORY_MODEL.activation_scale_3d < 1


def test_removing_attention_lowers_the_estimate_by_more_than_the_scores():
    with_attn = estimate_training_vram(_net(attention=(1, 2)), [128, 128], 4)
    without = estimate_training_vram(_net(attention=()), [128, 128], 4)
    assert without.attention_scores_gib == 0.0
    assert without.total_gib < with_attn.total_gib
    # q/k/v, norm and projections are counted too, not only the score matrices
    assert with_attn.total_gib - without.total_gib > with_attn.attention_scores_gib
    assert without.parameters < with_attn.parameters


def test_estimate_is_linear_in_batch_size_and_grows_with_patch():
    net = _net(dims=3, attention=(2,))
    e1, e2, e5 = (estimate_training_vram_gib(net, [32, 32, 32], b) for b in (1, 2, 5))
    assert e5 - e1 == pytest.approx(4 * (e2 - e1), rel=1e-9)
    assert estimate_training_vram_gib(net, [64, 32, 32], 2) > e2
    assert estimate_training_vram_gib(net, [32, 32, 32], 2, dtype="fp32") > e2


def test_time_embedding_and_conditioning_are_counted():
    base = _net()
    est = estimate_training_vram(base, [64, 64], 2)
    assert est.time_embedding_gib > 0
    temb = 4 * base["model_channels"]
    with_classes = count_parameters({**base, "num_classes": 3})
    assert with_classes - count_parameters(base) == (3 + 1) * temb  # + learned null token
    with_cont = count_parameters({**base, "num_continuous_conditions": 2})
    assert with_cont - count_parameters(base) == 2 * temb + temb + temb * temb + temb + temb
    # every residual block carries a (temb → 2·C) scale-shift projection
    n_res = sum(1 for b in unet_layout(base).blocks if b.kind == "res")
    assert n_res == 3 * 2 + 2 + 3 * 3  # encoder, middle, decoder


def test_static_memory_counts_weights_grads_adamw_and_ema():
    net = _net()
    est = estimate_training_vram(net, [32, 32], 2)
    m = DEFAULT_MEMORY_MODEL
    per_param = m.weight_bytes + m.grad_bytes + m.adamw_state_bytes + m.ema_bytes + m.optimizer_temp_bytes \
        + m.autocast_weight_copy_bytes
    assert per_param == 26
    assert est.static_gib == pytest.approx(est.parameters * per_param / GIB)


def _reference_unet_parameters(net: dict) -> int:
    """Parameter count of torch modules laid out as the estimate assumes (independent arithmetic)."""
    conv = nn.Conv2d if net["spatial_dims"] == 2 else nn.Conv3d
    temb = 4 * net["model_channels"]
    modules: list[nn.Module] = [nn.Linear(net["model_channels"], temb), nn.Linear(temb, temb)]
    for b in unet_layout(net).blocks:
        if b.kind in ("conv_in", "down", "up"):
            modules.append(conv(b.c_in, b.c_out, 3, padding=1))
        elif b.kind == "res":
            modules += [nn.GroupNorm(1, b.c_in), conv(b.c_in, b.c_out, 3, padding=1), nn.Linear(temb, 2 * b.c_out),
                        nn.GroupNorm(1, b.c_out), conv(b.c_out, b.c_out, 3, padding=1)]
            if b.c_in != b.c_out:
                modules.append(conv(b.c_in, b.c_out, 1))
        elif b.kind == "attn":
            modules += [nn.GroupNorm(1, b.c_in), nn.Linear(b.c_in, 3 * b.c_in), nn.Linear(b.c_in, b.c_in)]
        elif b.kind == "out":
            modules += [nn.GroupNorm(1, b.c_in), conv(b.c_in, b.c_out, 3, padding=1)]
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("dims", [2, 3])
def test_parameter_count_matches_torch_modules(dims):
    with torch.device("meta"):
        net = _net(dims=dims, attention=(1, 2), cond_channels=2)
        assert count_parameters(net) == _reference_unet_parameters(net)


def test_unet_layout_follows_adm():
    net = _net(attention=(2,))
    blocks = unet_layout(net).blocks
    kinds = [b.kind for b in blocks]
    assert kinds.count("down") == 2 and kinds.count("up") == 2
    assert kinds.count("attn") == 2 + 1 + 3  # encoder, middle, decoder at level 2
    decoder_inputs = [b.c_in for b in blocks if b.kind == "res"][-9:]
    # level 2 (128 ch): 128+128, 128+128, 128+64 (after the level-1 downsample skip) ...
    assert decoder_inputs[:3] == [256, 256, 192]
    assert len(unet_layout(net).skips) == 1 + 3 * 2 + 2


def test_unknown_dtype_and_wrong_patch_rank_are_rejected():
    with pytest.raises(ValueError, match="dtype"):
        estimate_training_vram(_net(), [32, 32], 2, dtype="int8")
    with pytest.raises(ValueError, match="spatial_dims"):
        estimate_training_vram(_net(), [32, 32, 32], 2)
