"""Planner thresholds and defaults, in one place (documentation/planning.md explains each).

Memory-estimate constants live in :mod:`nndiff.planning.memory` (``MemoryModel``) because they are
calibrated on a GPU separately.
"""
from __future__ import annotations

# --- spacing and transpose (nnU-Net v2's rule) -----------------------------------------------
#: max/min median spacing above which an axis counts as low-resolution (nnU-Net: 3).
ANISOTROPY_THRESHOLD = 3.0
#: Percentile of the per-case spacings used for the low-resolution axis of anisotropic data
#: (nnU-Net: 10th) so that the thin-slice cases are not thrown away by resampling.
ANISOTROPIC_AXIS_PERCENTILE = 10.0
#: 2D images carry this dummy spacing on axis 0 (nnU-Net v2 convention, architecture.md).
DUMMY_2D_SPACING = 999.0

# --- network topology ------------------------------------------------------------------------
#: Base width (channels of level 0) per spatial dimensionality.
MODEL_CHANNELS = {2: 64, 3: 32}
#: Channel multiplier of level l is min(2**l, MAX_CHANNEL_MULT[dims]).
MAX_CHANNEL_MULT = {2: 4, 3: 8}
#: Upper bound on downsamplings (levels - 1).
MAX_DOWNSAMPLINGS = {2: 6, 3: 5}
#: No axis is downsampled below this many voxels at the bottleneck (nnU-Net: 4).
MIN_FEATURE_MAP_SIZE = 4
#: An axis is only downsampled while its current spacing is at most this factor times the finest
#: current spacing (nnU-Net uses 2): coarse axes keep stride 1 until the others catch up.
STRIDE_SPACING_RATIO = 2.0
#: Residual blocks per level in the encoder (the decoder has one more, as in ADM).
NUM_RES_BLOCKS = 2
#: Self-attention at every level whose feature map has at most this many tokens (32² in 2D).
MAX_ATTENTION_TOKENS = 1024
NUM_HEAD_CHANNELS = 32
NORM_GROUPS = 32
#: Datasets with fewer cases than this get dropout (memorisation risk on small data).
SMALL_DATASET_CASES = 200
SMALL_DATASET_DROPOUT = 0.1

# --- patch and batch size ----------------------------------------------------------------------
#: The planned training step's estimate must stay below this fraction of the GPU memory target,
#: leaving headroom for the estimate's error (calibration goal: measured 50-100 % of the target).
TARGET_UTILIZATION = 0.85
MIN_BATCH_SIZE = 2
#: batch × patch voxels may not exceed this fraction of the dataset's voxels (nnU-Net: 5 %).
MAX_DATASET_FRACTION_PER_BATCH = 0.05
#: Patch scale factor step while searching the largest patch that fits (linear size).
PATCH_SCALE_STEP = 0.95
#: Smallest patch side (voxels) the search goes down to, unless the image itself is smaller.
MIN_PATCH_SIDE = 16
#: Mixed precision assumed for training on the GPU.
TRAINING_DTYPE = "bf16"

# --- latent configuration ----------------------------------------------------------------------
#: Plan a latent configuration when the pixel-space patch covers less than this fraction of the
#: median image's voxels (nnU-Net plans 3d_lowres below the same 25 %).
LATENT_MIN_PATCH_COVERAGE = 0.25
#: ... or when the median image has at least this many voxels ("large images"). Sampling runs the
#: network on the whole image at every step, so its cost grows with the image even where a pixel-space
#: patch would fit: at 128³ voxels in 3D a 4× latent has 64× fewer voxels per step (whole-brain 1 mm
#: MR, the 3D latent models of Pinaya et al. 2022 at 160×224×160); 2D images stay cheap up to 1024².
LATENT_LARGE_IMAGE_VOXELS = {2: 1024 * 1024, 3: 128 * 128 * 128}
#: Autoencoder downsampling per axis: f=8 in 2D (Stable Diffusion, Rombach et al. 2022),
#: f=4 in 3D (3D medical LDMs keep more detail per latent voxel).
LATENT_DOWNSAMPLING = {2: 8, 3: 4}
LATENT_MIN_CHANNELS = 4
#: Autoencoder width of level 0: 64 in 2D, 32 in 3D (MONAI's 3D brain latent-diffusion tutorial
#: uses 32-64-64; 3D activations cost a factor Z more memory per patch side).
AUTOENCODER_BASE_CHANNELS = {2: 64, 3: 32}
#: Channel multiplier of autoencoder level l is min(2**l, AUTOENCODER_MAX_CHANNEL_MULT[dims]).
AUTOENCODER_MAX_CHANNEL_MULT = {2: 4, 3: 2}
#: Residual blocks per autoencoder level: 2 in 2D (Stable Diffusion's KL autoencoder), 1 in 3D
#: (halves the activations kept per level; MONAI's 3D tutorial uses 1).
AUTOENCODER_NUM_RES_BLOCKS = {2: 2, 3: 1}
#: Loss weights of the autoencoder stage (L1 + ssim_weight (1 - SSIM) + kl_weight KL): a small KL
#: keeps the latent close to N(0, I) without blurring (Rombach et al. 2022 use ~1e-6 per element).
AUTOENCODER_KL_WEIGHT = 1e-6
AUTOENCODER_SSIM_WEIGHT = 0.5
#: The autoencoder trains this many epochs (of the trainer's iterations per epoch): a quarter of the
#: diffusion model's default 400 — a reconstruction loss has one target per input, not one per noise
#: level, and plateaus much sooner.
AUTOENCODER_NUM_EPOCHS = 100
#: Full-resolution fp32 tensors per voxel and image channel that the autoencoder loss keeps (input,
#: reconstruction, |difference|, SSIM local means / variances / covariance and map), added to the
#: memory estimate of the UNet-shaped stand-in (see plan_autoencoder_block).
AUTOENCODER_LOSS_TENSORS = 12
#: The stand-in's estimate (UNet-shaped, keeps skip tensors the autoencoder does not) times this factor is
#: the planned autoencoder step's memory. Measured max_memory_reserved / uncalibrated estimate of the
#: planned 3D steps (torch.compile, bf16; H200, session 10, documentation/benchmarks.md): 0.687 / 0.777 /
#: 0.665 at 8 / 24 / 64 GiB. Without it the 64 GiB plan used 49 % of its target.
AUTOENCODER_MEMORY_CALIBRATION = 0.72
#: Decoding without gradients keeps no activations for a backward pass: a decode of this many times
#: the autoencoder's training voxels (patch × batch) fits in what the training step used.
AUTOENCODER_DECODE_HEADROOM = 4

# --- diffusion ---------------------------------------------------------------------------------
NUM_TRAIN_TIMESTEPS = 1000
#: Side length at which the cosine schedule was designed (ImageNet 64×64, Nichol & Dhariwal 2021);
#: larger patches get their log-SNR shifted (Hoogeboom et al. 2023).
SNR_SHIFT_REFERENCE_SIDE = 64
MIN_SNR_GAMMA = 5.0
SIMPLEX_OCTAVES = 6
SIMPLEX_PERSISTENCE = 0.8
SIMPLEX_FREQUENCY = 64
CFG_CONDITION_DROPOUT = 0.1
CFG_GUIDANCE_SCALE = 2.0

# --- normalization -----------------------------------------------------------------------------
PER_IMAGE_LOW_PERCENTILE = 0.5
PER_IMAGE_HIGH_PERCENTILE = 99.5
