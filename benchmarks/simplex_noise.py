"""Benchmark: simplex noise generation against one training step of a small conv net or UNet.

Prints milliseconds per batch for simplex noise (2D 64x1x128^2 as a plane of 3D noise, the default,
and with 2D OpenSimplex; 3D 8x1x64^3), Gaussian noise for scale, and a forward + backward pass
of a 4-layer, 64-channel conv net (torch.nn) on the same batch, measured in the same run, plus the
ratio noise / training step. Issue 3 asks that noise is not the bottleneck of a training step.

    python benchmarks/simplex_noise.py [--repeats 3] [--threads N] [--device cpu|cuda] [--reference convnet|unet]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from nndiff.diffusion.noise import GaussianNoise, SimplexNoise


def small_conv_net(spatial_dims: int, channels: int = 64) -> nn.Module:
    """Four 3x3(x3) convolutions, 1 -> 64 -> 64 -> 64 -> 1 channels, ReLU in between."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(
        conv(1, channels, 3, padding=1), nn.ReLU(),
        conv(channels, channels, 3, padding=1), nn.ReLU(),
        conv(channels, channels, 3, padding=1), nn.ReLU(),
        conv(channels, 1, 3, padding=1),
    )


def small_unet(spatial_dims: int) -> nn.Module:
    """A small nnDiff UNet (32 base channels, 3 levels, 1 res block, attention at the deepest level)."""
    from nndiff.networks import build_network

    block = {
        "architecture": "unet", "spatial_dims": spatial_dims, "in_channels": 1, "out_channels": 1,
        "model_channels": 32, "channel_mult": [1, 2, 2], "strides": [[2] * spatial_dims] * 2,
        "num_res_blocks": 1, "attention_levels": [2], "num_head_channels": 32, "norm_groups": 8,
    }
    unet = build_network(block, seed=0)

    class WithTime(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.unet(x, torch.full((x.shape[0],), 500.0, device=x.device))

    return WithTime()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``step`` in ms, after one warm-up call."""
    step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def training_step(net: nn.Module, shape: tuple[int, ...], device: torch.device) -> Callable[[], None]:
    """Forward + backward of ``net`` on a fixed batch (MSE to a fixed target), no optimizer step."""
    x = torch.randn(shape, device=device)
    target = torch.randn(shape, device=device)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(net(x), target)
        loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", choices=("convnet", "unet"), default="convnet",
                        help="training step to compare with: 4-layer conv net or a small nnDiff UNet")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} repeats={args.repeats}")

    cases = [
        ("2D", (64, 1, 128, 128)),
        ("3D", (8, 1, 64, 64, 64)),
    ]
    for name, shape in cases:
        spatial_dims = len(shape) - 2
        net = (small_unet(spatial_dims) if args.reference == "unet" else small_conv_net(spatial_dims)).to(device)
        step_ms = time_ms(training_step(net, shape, device), device, args.repeats)
        gauss_ms = time_ms(lambda: GaussianNoise()(shape, generator=generator, device=device), device, args.repeats)
        variants = [("simplex (default)", SimplexNoise())]
        if spatial_dims == 2:
            variants.append(("simplex planar_2d=False", SimplexNoise(planar_2d=False)))
        shape_text = "x".join(str(s) for s in shape)
        print(f"{name} {shape_text}: {args.reference} forward+backward {step_ms:9.1f} ms | gaussian noise {gauss_ms:7.2f} ms")
        for label, noise in variants:
            noise_ms = time_ms(lambda: noise(shape, generator=generator, device=device), device, args.repeats)
            print(f"    {label:<24s} {noise_ms:9.1f} ms   ratio noise / training step = {noise_ms / step_ms:.3f}")


if __name__ == "__main__":
    main()
