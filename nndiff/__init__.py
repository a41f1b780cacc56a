"""nnDiff: self-configuring diffusion models for medical imaging."""

__version__ = "0.1.0"
