"""Autoencoder stage networks: shapes, VQ straight-through, sliding windows, scale factor, hash."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nndiff.errors import NnDiffError, PlansError
from nndiff.networks.autoencoder import (AutoencoderKL, AutoencoderVQ, build_autoencoder, kl_divergence,
                                         measure_scale_factor, parse_autoencoder_config, weights_sha256)
from nndiff.networks.autoencoder_windows import receptive_radius, sliding_window_decode, sliding_window_encode
from nndiff.networks.layers import ZERO_INIT_ATTR

#: Narrow networks: the default 32 base channels are for GPUs.
SMALL = {"base_channels": 8, "norm_groups": 4}


def _block(factors, latent_channels=4, **extra):
    return {"downsampling_factors": list(factors), "latent_channels": latent_channels, **SMALL, **extra}


def _randomise_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Untrained residual branches start at zero; give them weights so every layer matters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if getattr(m, ZERO_INIT_ATTR, False):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.05)


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    data_range = float(reference.max() - reference.min())
    return 10 * math.log10(data_range ** 2 / float(((x - reference) ** 2).mean()))


@pytest.mark.parametrize("factors, in_channels, image", [
    ([4, 4], 1, (2, 16, 16)),
    ([8, 8], 2, (1, 16, 16)),
    ([1, 4, 4], 1, (2, 8, 16, 16)),   # anisotropic: axis 0 is never downsampled
    ([2, 4, 4], 2, (1, 8, 16, 16)),
])
def test_kl_encode_decode_shapes(factors, in_channels, image):
    torch.manual_seed(0)
    ae = build_autoencoder(_block(factors), in_channels, len(factors))
    assert isinstance(ae, AutoencoderKL)
    x = torch.randn(image[0], in_channels, *image[1:])
    mean, logvar = ae.encode(x)
    latent = tuple(n // f for n, f in zip(image[1:], factors))
    assert mean.shape == logvar.shape == (image[0], 4, *latent)
    assert ae.latent_shape(image[1:]) == latent
    z = ae.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(1))
    assert z.shape == mean.shape and not torch.equal(z, mean)
    assert ae.decode(z).shape == x.shape
    recon, m2, _ = ae(x)
    assert recon.shape == x.shape and torch.equal(m2, mean)


def test_per_axis_strides_follow_the_factors():
    cfg = parse_autoencoder_config(_block([1, 2, 8]), 1, 3)
    assert cfg.strides() == [(1, 2, 2), (1, 1, 2), (1, 1, 2)]
    assert cfg.channel_multipliers == (1, 2, 4, 4)


def test_eval_forward_decodes_the_mean_and_kl_is_zero_for_the_prior():
    ae = build_autoencoder(_block([2, 2]), 1, 2).eval()
    x = torch.randn(1, 1, 8, 8)
    recon, mean, _ = ae(x)
    assert torch.allclose(recon, ae.decode(mean))
    assert float(kl_divergence(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))) == 0.0
    assert float(kl_divergence(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))) == pytest.approx(0.5 * 36)


def test_vq_shapes_and_straight_through_gradient():
    torch.manual_seed(0)
    ae = build_autoencoder(_block([2, 4, 4], vq=True, codebook_size=16), 1, 3)
    assert isinstance(ae, AutoencoderVQ)
    x = torch.randn(2, 1, 8, 16, 16)
    z_q, indices, vq_loss = ae.encode(x)
    assert z_q.shape == (2, 4, 4, 4, 4) and indices.shape == (2, 4, 4, 4) and vq_loss.ndim == 0
    assert indices.dtype == torch.int64 and int(indices.max()) < 16
    # Forward values are exactly the codewords of the chosen indices.
    codewords = ae.quantizer.codebook.weight[indices].movedim(-1, 1)
    assert torch.allclose(z_q, codewords, atol=1e-6)
    # Straight-through: d(sum z_q)/d z_e is the identity even though argmin has no gradient.
    z_e = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    z_q2, _, _ = ae.quantize(z_e)
    z_q2.sum().backward()
    assert torch.equal(z_e.grad, torch.ones_like(z_e))
    # The loss reaches encoder (through the estimator), decoder and codebook.
    recon, _, vq_loss = ae(x)
    ((recon - x).abs().mean() + vq_loss).backward()
    for part in (ae.encoder.conv_in.weight, ae.decoder.conv_in.weight, ae.quantizer.codebook.weight):
        assert part.grad is not None and float(part.grad.abs().sum()) > 0


@pytest.mark.parametrize("block, problem", [
    ({"latent_channels": 4}, "downsampling_factors is missing"),
    (_block([3, 4]), "powers of two"),
    (_block([4, 4, 4]), "must list 2 powers of two"),
    (_block([4, 4], channel_multipliers=[1, 2]), "channel_multipliers must list 3"),
    (_block([4, 4], base_channels=6), "norm_groups 4 must divide"),
    (_block([4, 4], latent_chanels=4), "unknown key(s) ['latent_chanels']"),
    (_block([4, 4], vq="yes"), "autoencoder.vq must be true or false"),
])
def test_invalid_block_names_key_and_fix(block, problem):
    with pytest.raises(PlansError) as err:
        build_autoencoder(block, 1, 2)
    assert problem in str(err.value) and "Fix:" in str(err.value)


def test_input_not_divisible_by_factors_is_refused():
    ae = build_autoencoder(_block([4, 4]), 1, 2)
    with pytest.raises(NnDiffError, match="not divisible by the downsampling factors"):
        ae.encode(torch.zeros(1, 1, 16, 10))


def test_receptive_radius_counts_convs_at_their_resolution():
    ae = build_autoencoder(_block([1, 2], channel_multipliers=[1, 1]), 1, 2)
    # Decoder: conv_in + 2 mid blocks x 2 convs + level-1 block (2 convs) at latent resolution = 7 along
    # both axes; after upsampling axis 1 by 2, the upsample conv, level-0 block (2) and head conv count 1/2.
    assert receptive_radius(ae.decoder, 2) == (11.0, 9.0)


def test_sliding_window_decode_matches_whole_volume_2d():
    torch.manual_seed(0)
    ae = build_autoencoder(_block([4, 4]), 1, 2).eval()
    _randomise_zero_init(ae)
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        whole = ae.decode(z)
    blended = sliding_window_decode(ae, z, latent_window=8, overlap=0.5)
    assert blended.shape == whole.shape
    assert psnr(blended, whole) >= 40.0
    # Without the whole-volume GroupNorm statistics and the halo, the windows disagree visibly:
    # this is what the two mechanisms are for.
    naive = sliding_window_decode(ae, z, latent_window=8, overlap=0.5, context=0, exact_norm=False)
    assert psnr(naive, whole) < 35.0


def test_sliding_window_decode_and_encode_3d_anisotropic():
    torch.manual_seed(1)
    ae = build_autoencoder(_block([1, 4, 4]), 1, 3).eval()
    _randomise_zero_init(ae)
    z = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        whole = ae.decode(z)
    # Default halo (the receptive radius): at this tiny size each window sees the whole latent, so this
    # checks the per-axis window/crop/blend bookkeeping; the 2D test above checks the halo itself.
    blended = sliding_window_decode(ae, z, [4, 4, 4], overlap=0.5, mode="linear")
    assert psnr(blended, whole) >= 40.0
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        mean, logvar = ae.encode(x)
    s_mean, s_logvar = sliding_window_encode(ae, x, [4, 8, 8], overlap=0.5)
    assert psnr(s_mean, mean) >= 40.0 and psnr(s_logvar, logvar) >= 40.0


def test_sliding_window_refuses_bad_windows():
    ae = build_autoencoder(_block([4, 4]), 1, 2)
    with pytest.raises(NnDiffError, match="multiples of the"):
        sliding_window_encode(ae, torch.zeros(1, 1, 16, 16), [6, 8])
    with pytest.raises(NnDiffError, match="overlap"):
        sliding_window_decode(ae, torch.zeros(1, 4, 4, 4), 2, overlap=1.0)
    with pytest.raises(NnDiffError, match="differ from the autoencoder"):
        sliding_window_decode(ae, torch.zeros(1, 4, 4, 4), 2, factors=[2, 2])


def test_scale_factor_is_one_over_latent_std():
    torch.manual_seed(0)
    ae = build_autoencoder(_block([2, 2]), 1, 2).eval()
    images = [np.random.default_rng(i).normal(size=(1, 8, 8)).astype(np.float32) for i in range(3)]
    with torch.no_grad():
        means = torch.cat([ae.encode(torch.from_numpy(a)[None])[0] for a in images])
    expected = 1.0 / float(means.double().std(unbiased=False))
    assert math.isnan(float(ae.latent_scale_factor))
    with pytest.raises(NnDiffError, match="never measured"):
        ae.scale_factor()
    factor = measure_scale_factor(ae, images)
    assert factor == pytest.approx(expected, rel=1e-5)
    assert ae.scale_factor() == pytest.approx(expected, rel=1e-6)
    # Stored with the weights: a fresh model loading the state dict knows it.
    fresh = build_autoencoder(_block([2, 2]), 1, 2)
    fresh.load_state_dict(ae.state_dict())
    assert fresh.scale_factor() == pytest.approx(expected, rel=1e-6)
    # Batches as dicts (a loader) give the same value; windows too.
    batch = {"data": torch.from_numpy(np.stack(images))}
    assert measure_scale_factor(ae, [batch], store=False) == pytest.approx(expected, rel=1e-5)
    assert measure_scale_factor(ae, images, latent_window=[2, 2], store=False) == pytest.approx(expected, rel=1e-4)


def test_scale_factor_encodes_whole_images_within_the_voxel_limit(monkeypatch):
    """Within ``max_whole_voxels`` no sliding windows (the latent cache encodes such volumes whole);
    above it the windows are used."""
    import nndiff.networks.autoencoder as module

    torch.manual_seed(0)
    ae = build_autoencoder(_block([2, 2]), 1, 2).eval()
    images = [np.random.default_rng(i).normal(size=(1, 8, 8)).astype(np.float32) for i in range(2)]
    whole = measure_scale_factor(ae, images, store=False)
    calls = []
    real = module.sliding_window_encode
    monkeypatch.setattr(module, "sliding_window_encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert measure_scale_factor(ae, images, latent_window=[2, 2], max_whole_voxels=64, store=False) == whole
    assert calls == []
    windowed = measure_scale_factor(ae, images, latent_window=[2, 2], max_whole_voxels=63, store=False)
    assert len(calls) == 2 and windowed == pytest.approx(whole, rel=1e-4)


def test_scale_factor_of_known_latents():
    """A network whose latent is exactly 3 * image: factor = 1 / (3 * std(images))."""
    ae = build_autoencoder(_block([1, 1], latent_channels=1, channel_multipliers=[1]), 1, 2)

    class Triple(torch.nn.Module):
        def forward(self, x):
            return torch.cat([3 * x, torch.zeros_like(x)], dim=1)

    ae.encoder = Triple()
    data = np.random.default_rng(0).normal(2.0, 0.5, size=(4, 1, 6, 6)).astype(np.float32)
    assert measure_scale_factor(ae, [data]) == pytest.approx(1.0 / (3 * data.astype(np.float64).std()), rel=1e-6)
    with pytest.raises(NnDiffError, match="zero variance"):
        measure_scale_factor(ae, [np.ones((1, 1, 4, 4), np.float32)])
    with pytest.raises(NnDiffError, match="got no images"):
        measure_scale_factor(ae, [])


def test_weights_hash_names_the_weights():
    ae = build_autoencoder(_block([2, 2]), 1, 2)
    first = weights_sha256(ae.state_dict())
    assert first == weights_sha256({k: v.clone() for k, v in ae.state_dict().items()}) and len(first) == 64
    with torch.no_grad():
        ae.decoder.conv_in.bias[0] += 1e-3
    assert weights_sha256(ae.state_dict()) != first
