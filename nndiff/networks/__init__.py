"""Networks built from the plans ``network`` block (see documentation/networks.md)."""
from nndiff.networks.builder import ARCHITECTURES, build_network
from nndiff.networks.conditioning import NULL_LABEL, drop_conditions
from nndiff.networks.config import UNetConfig, parse_network_config
from nndiff.networks.unet import UNet
from nndiff.networks.utils import count_parameters, estimate_flops

__all__ = [
    "ARCHITECTURES",
    "NULL_LABEL",
    "UNet",
    "UNetConfig",
    "build_network",
    "count_parameters",
    "drop_conditions",
    "estimate_flops",
    "parse_network_config",
]
