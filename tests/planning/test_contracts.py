"""The planned blocks are accepted by their consumers: the diffusion core's factories and the
network builder (whose parameter count the memory estimate must reproduce exactly)."""
from __future__ import annotations

import pytest
import torch
from planning_fixtures import (
    CT_FG,
    CT_WHOLE,
    MAG_WHOLE,
    MR_FG,
    MR_WHOLE,
    ct_fingerprint,
    dataset_json,
    fingerprint,
    mr_fingerprint,
    xray_fingerprint,
)

from nndiff.diffusion.config import DiffusionConfig, build_noise, build_process, build_sampler
from nndiff.diffusion.noise import GaussianNoise, SimplexNoise
from nndiff.networks import build_network, parse_network_config
from nndiff.planning import count_parameters, plan_experiment

CONDITIONS = {"sex": {"type": "categorical", "values": ["F", "M"]}, "age": {"type": "continuous"}}


def _plans() -> dict[str, dict]:
    small2d = dict(spatial_dims=2, props=((MR_FG, MR_WHOLE),), channels=(("grey", "other", "image"),))
    return {
        "ct": plan_experiment(ct_fingerprint(), dataset_json(conditions=CONDITIONS)),
        "mr": plan_experiment(mr_fingerprint(), dataset_json()),
        "xray": plan_experiment(xray_fingerprint(), dataset_json()),
        "anomaly": plan_experiment(fingerprint((1, 32, 32), (999.0, 1.0, 1.0), 20, task="anomaly_detection",
                                               **small2d), dataset_json("anomaly_detection")),
        "reconstruction": plan_experiment(
            fingerprint((1, 32, 32), (999.0, 1.0, 1.0), 20, spatial_dims=2, is_complex=True,
                        channels=(("MR", "mr", "image"),), props=((MAG_WHOLE, MAG_WHOLE),)),
            dataset_json("reconstruction")),
        "translation": plan_experiment(
            fingerprint((16, 16, 16), (1.0, 1.0, 1.0), 20, channels=(("T1", "mr", "image"), ("CT", "ct", "target")),
                        props=((MR_FG, MR_WHOLE), (CT_FG, CT_WHOLE))), dataset_json("translation")),
        "segmentation": plan_experiment(
            fingerprint((16, 16, 16), (1.0, 1.0, 1.0), 20, channels=(("T2", "mr", "image"),),
                        props=((MR_FG, MR_WHOLE),)), dataset_json("segmentation", labels={"background": 0, "a": 1})),
    }


PLANS = _plans()


@pytest.mark.parametrize("kind", list(PLANS))
def test_diffusion_block_builds_process_sampler_and_noise(kind):
    for name, config in PLANS[kind]["configurations"].items():
        block = config["diffusion"]
        cfg = DiffusionConfig.from_dict(block)  # rejects unknown keys
        assert cfg.snr_shift == block["snr_shift"] and cfg.parameterization.value == "v"
        build_process(block)
        sampler = build_sampler(block)
        assert sampler is not None
        noise = build_noise(block)
        assert isinstance(noise, SimplexNoise if kind == "anomaly" else GaussianNoise), (kind, name)


@pytest.mark.parametrize("kind", list(PLANS))
def test_network_block_builds_and_parameter_count_matches(kind):
    for name, config in PLANS[kind]["configurations"].items():
        net = config["network"]
        parse_network_config(net)
        with torch.device("meta"):  # structure only: no memory, no init cost
            model = build_network(net)
        actual = sum(p.numel() for p in model.parameters())
        assert count_parameters(net) == actual, (kind, name)
