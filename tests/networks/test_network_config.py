"""Builder validation: every bad network block fails with a PlansError naming key and fix."""
from __future__ import annotations

import json

import pytest
import torch

from nndiff.errors import PlansError
from nndiff.networks import UNet, build_network, parse_network_config

BAD_BLOCKS = [
    ({"architecture": "transformer"}, "network.architecture", "unknown architecture"),
    ({"spatial_dims": 4}, "network.spatial_dims", "must be 2 or 3"),
    ({"strides": [[2, 2]]}, "network.strides", "len(channel_mult) - 1 = 2"),
    ({"strides": [[2, 2], [1, 2, 2]]}, "network.strides[1]", "one factor per spatial axis"),
    ({"strides": [[2, 2], [3, 2]]}, "network.strides[1]", "factors must be in [1, 2]"),
    ({"channel_mult": []}, "network.channel_mult", "non-empty list"),
    ({"norm_groups": 3}, "network.norm_groups", "3 does not divide the 8 channels of level 0"),
    ({"num_head_channels": 12}, "network.num_head_channels", "does not divide the 16 channels"),
    ({"attention_levels": [5]}, "network.attention_levels", "level 5 does not exist"),
    ({"attention_levels": [1, 1]}, "network.attention_levels", "duplicates"),
    ({"model_channels": True}, "network.model_channels", "integer >= 1"),
    ({"in_channels": 0}, "network.in_channels", "integer >= 1"),
    ({"cond_channels": -1}, "network.cond_channels", "integer >= 0"),
    ({"num_res_blocks": 0}, "network.num_res_blocks", "integer >= 1"),
    ({"num_classes": 0}, "network.num_classes", "null or an integer >= 1"),
    ({"dropout": 1.0}, "network.dropout", "[0, 1)"),
    ({"modle_channels": 8}, "network.modle_channels", "not a known network key"),
]


@pytest.mark.parametrize("override,key,problem", BAD_BLOCKS, ids=[b[1] + ":" + b[2][:12] for b in BAD_BLOCKS])
def test_invalid_block_names_key_problem_and_fix(make_block, override, key, problem):
    with pytest.raises(PlansError) as info:
        build_network(make_block(**override))
    message = str(info.value)
    assert f"{key}:" in message
    assert problem in message
    assert "Fix:" in message


def test_missing_key_is_named(make_block):
    block = make_block()
    del block["model_channels"]
    with pytest.raises(PlansError, match=r"network\.model_channels: is missing"):
        build_network(block)


def test_all_problems_are_listed_at_once(make_block):
    with pytest.raises(PlansError) as info:
        build_network(make_block(architecture="x", in_channels=0, dropout=-0.5))
    message = str(info.value)
    assert message.startswith("3 problem(s)")
    for key in ("network.architecture", "network.in_channels", "network.dropout"):
        assert key in message


def test_non_mapping_block_is_rejected():
    with pytest.raises(PlansError, match="must be a JSON object"):
        build_network([1, 2, 3])  # type: ignore[arg-type]


def test_optional_keys_default_to_unconditional(make_block):
    block = make_block()
    for key in ("cond_channels", "dropout", "num_classes", "num_continuous_conditions"):
        del block[key]
    config = parse_network_config(block)
    assert (config.cond_channels, config.dropout, config.num_classes, config.num_continuous_conditions) == (0, 0.0, None, 0)


def test_network_config_round_trips_through_json(make_block):
    block = make_block(spatial_dims=3, strides=[[1, 2, 2], [2, 2, 2]], num_classes=2)
    model = build_network(block)
    assert isinstance(model, UNet)
    saved = json.loads(json.dumps(model.network_config))
    assert saved == block
    assert parse_network_config(saved) == model.config


def test_seeded_construction_is_deterministic_and_leaves_global_rng_alone(make_block):
    block = make_block(num_classes=3, num_continuous_conditions=2)
    state_before = torch.random.get_rng_state()
    a = build_network(block, seed=7).state_dict()
    b = build_network(block, seed=7).state_dict()
    c = build_network(block, seed=8).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state_before)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unseeded_construction_follows_global_seed(make_block):
    block = make_block()
    torch.manual_seed(3)
    a = build_network(block).state_dict()
    torch.manual_seed(3)
    b = build_network(block).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channel_rules_are_checked_even_when_strides_are_wrong(make_block):
    with pytest.raises(PlansError) as info:
        build_network(make_block(strides=[[2, 2]], norm_groups=3))
    assert "network.strides:" in str(info.value)
    assert "network.norm_groups:" in str(info.value)
