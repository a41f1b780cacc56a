"""Memory plan check: measured max_memory_reserved of planned training steps vs the planner's estimate.

For each (fingerprint, GPU-memory target, configuration) the planner's network, patch and batch run
3 training steps (bf16 autocast, AdamW, EMA, gradient clipping) on CUDA; one JSON row per case is
printed with the estimate, the measured reserved memory and the ratios to target and estimate.

    PYTHONPATH=. python benchmarks/memory_plan.py [kind:target:config ...]    # eager
    COMPILE=1 PYTHONPATH=. python benchmarks/memory_plan.py ...               # torch.compile
    ACT_SCALE_2D=0.4 ACT_SCALE_3D=0.5 COMPILE=1 ...   # plan with a candidate activation calibration
    DEVICE=cpu SMOKE=1 PYTHONPATH=. python benchmarks/memory_plan.py mr:8:3d_latent:ae   # code path only

Case names: ``kind:target:config`` runs the configuration's diffusion step (for a latent
configuration: the UNet on latent patches, ``in_channels`` = latent channels);
``kind:target:config:ae`` runs the autoencoder stage of a latent configuration at its planned
``autoencoder.patch_size`` and ``batch_size`` with the stage's loss (L1 + SSIM + KL,
``nndiff.tasks.autoencoder``), compared with ``autoencoder_estimated_vram_gib``.

ACT_SCALE_2D / ACT_SCALE_3D replace MemoryModel.activation_scale_2d/_3d of the planner's memory
model for this run (see benchmarks/memory_calibrate.py, which derives them from measured rows).
``SMOKE=1`` shrinks every case to batch 1 and the smallest valid patch, to check the code path on a
CPU; its rows are not measurements.

Fingerprints are the large synthetic ones of tests/planning/planning_fixtures.py. Results and the
command used are recorded in documentation/benchmarks.md.
"""
import copy, dataclasses, json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "planning"))
import torch
import torch.nn.functional as F
from planning_fixtures import ct_fingerprint, mr_fingerprint, xray_fingerprint, dataset_json
from nndiff.planning import plan_experiment, estimate_training_vram
from nndiff.networks import build_network
from nndiff.networks.autoencoder import build_autoencoder, kl_divergence
from nndiff.planning.topology import shape_divisor
from nndiff.tasks.autoencoder import data_range_per_sample, ssim_torch
import nndiff.planning.memory as memory

_scales = {k: float(os.environ[e]) for k, e in (("activation_scale_2d", "ACT_SCALE_2D"),
                                                  ("activation_scale_3d", "ACT_SCALE_3D")) if e in os.environ}
if _scales:
    memory.DEFAULT_MEMORY_MODEL = dataclasses.replace(memory.DEFAULT_MEMORY_MODEL, **_scales)

compile_ = os.environ.get("COMPILE") == "1"
smoke = os.environ.get("SMOKE") == "1"
device = torch.device(os.environ.get("DEVICE", "cuda"))
cuda = device.type == "cuda"
DEFAULT_CASES = [
    "mr:8:2d", "mr:8:3d_fullres", "ct:8:3d_fullres", "xray:8:2d",
    "ct:24:2d", "ct:24:3d_fullres", "mr:24:2d", "xray:24:2d",
    "mr:64:3d_fullres", "xray:64:2d", "mr:64:2d",
    # latent configurations (issue 7): diffusion step on latents, then the autoencoder stage
    "mr:8:3d_latent", "mr:24:3d_latent", "mr:64:3d_latent",
    "mr:8:3d_latent:ae", "mr:24:3d_latent:ae", "mr:64:3d_latent:ae",
]
FINGERPRINTS = {"ct": ct_fingerprint, "mr": mr_fingerprint, "xray": xray_fingerprint}


def parse_case(text):
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in FINGERPRINTS or (len(parts) == 4 and parts[3] != "ae"):
        sys.exit(f"memory_plan.py: bad case {text!r}; use kind:target:config[:ae] with kind in {sorted(FINGERPRINTS)}")
    return parts[0], float(parts[1]), parts[2], len(parts) == 4


def diffusion_step(model, x):
    t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    return F.mse_loss(model(x, t).float(), x)


def autoencoder_step(model, x):
    recon, mean, logvar = model(x)
    l1 = (recon.float() - x).abs().mean()
    ssim = ssim_torch(recon, x, data_range_per_sample(x)).mean()
    return l1 + 0.5 * (1 - ssim) + 1e-6 * kl_divergence(mean, logvar) / x[0].numel()


def build_case(c, ae):
    """(model, in_channels, patch, batch, estimate_gib, memory parts or None) of one case."""
    if ae:
        block = c.get("autoencoder")
        if block is None:
            sys.exit("memory_plan.py: ':ae' needs a latent configuration (with an 'autoencoder' block)")
        dims, ch = c["spatial_dims"], int(block["in_channels"])
        model = build_autoencoder(block, ch, dims)
        patch, batch = block["patch_size"], block["batch_size"]
        if smoke:
            patch = list(block["downsampling_factors"])
        return model, ch, patch, batch, c["autoencoder_estimated_vram_gib"], None
    net = c["network"]
    patch, batch = c["patch_size"], c["batch_size"]
    est = estimate_training_vram(net, patch, batch)
    if smoke:
        patch = list(shape_divisor(net["strides"], net["spatial_dims"]))
    return build_network(net), net["in_channels"], patch, batch, est.total_gib, est


out = []
for text in sys.argv[1:] or DEFAULT_CASES:
    kind, target, name, ae = parse_case(text)
    plan = plan_experiment(FINGERPRINTS[kind](), dataset_json(), gpu_memory_target_gib=target)
    if name not in plan["configurations"]:
        sys.exit(f"memory_plan.py: {kind} at {target} GiB has no configuration {name!r} "
                 f"(planned: {sorted(plan['configurations'])})")
    c = plan["configurations"][name]
    model, in_ch, patch, batch, estimate, parts = build_case(c, ae)
    if smoke:
        batch = 1
    if cuda:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if compile_ else model
    step = autoencoder_step if ae else diffusion_step
    t0 = time.time()
    for _ in range(3):
        x = torch.randn(batch, in_ch, *patch, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step(fwd, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-3)
    if cuda:
        torch.cuda.synchronize()
    row = dict(case=text, patch=list(patch), batch=batch, target=target, estimate=round(estimate, 3),
               compile=compile_, smoke=smoke, sec=round(time.time() - t0, 1), loss=round(float(loss.detach()), 4))
    if parts is not None:
        row.update(static=round(parts.static_gib, 3), act=round(parts.activations_gib, 3),
                   attn=round(parts.attention_scores_gib, 3), workspace=parts.workspace_gib,
                   activation_scale=memory.DEFAULT_MEMORY_MODEL.activation_scale(c["network"]["spatial_dims"]))
    if cuda:
        row["reserved"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        row["allocated"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["reserved_over_target"] = round(row["reserved"] / target, 3)
        row["reserved_over_estimate"] = round(row["reserved"] / row["estimate"], 3)
    print(json.dumps(row), flush=True)
    out.append(row)
    del model, ema, opt, fwd
# One file per invocation: processes run in parallel (one case each) must not overwrite each other's rows.
suffix = "" if len(sys.argv) == 1 else "_" + "_".join(a.replace(":", "-") for a in sys.argv[1:])[:120]
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"measure_{'compiled' if compile_ else 'eager'}{suffix}.json"), "w"), indent=1)
