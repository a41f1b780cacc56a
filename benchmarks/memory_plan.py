"""Memory plan check: measured max_memory_reserved of planned training steps vs the planner's estimate.

For each (fingerprint, GPU-memory target, configuration) the planner's network, patch and batch run
3 training steps (bf16 autocast, AdamW, EMA, gradient clipping) on CUDA; one JSON row per case is
printed with the estimate, the measured reserved memory and the ratios to target and estimate.

    PYTHONPATH=. python benchmarks/memory_plan.py [kind:target:config ...]    # eager
    COMPILE=1 PYTHONPATH=. python benchmarks/memory_plan.py ...               # torch.compile
    ACT_SCALE_2D=0.4 ACT_SCALE_3D=0.5 COMPILE=1 ...   # plan with a candidate activation calibration

ACT_SCALE_2D / ACT_SCALE_3D replace MemoryModel.activation_scale_2d/_3d of the planner's memory
model for this run (see benchmarks/memory_calibrate.py, which derives them from measured rows).

Fingerprints are the large synthetic ones of tests/planning/planning_fixtures.py. Results and the
command used are recorded in documentation/benchmarks.md.
"""
import copy, json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "planning"))
import torch
import torch.nn.functional as F
from planning_fixtures import ct_fingerprint, mr_fingerprint, xray_fingerprint, dataset_json
from nndiff.planning import plan_experiment, estimate_training_vram
from nndiff.networks import build_network
import dataclasses
import nndiff.planning.memory as memory

_scales = {k: float(os.environ[e]) for k, e in (("activation_scale_2d", "ACT_SCALE_2D"),
                                                  ("activation_scale_3d", "ACT_SCALE_3D")) if e in os.environ}
if _scales:
    memory.DEFAULT_MEMORY_MODEL = dataclasses.replace(memory.DEFAULT_MEMORY_MODEL, **_scales)

compile_ = os.environ.get("COMPILE") == "1"
cases = [(k, t, n) for k, t, n in [
    ("mr", 8, "2d"), ("mr", 8, "3d_fullres"), ("ct", 8, "3d_fullres"), ("xray", 8, "2d"),
    ("ct", 24, "2d"), ("ct", 24, "3d_fullres"), ("mr", 24, "2d"), ("xray", 24, "2d"),
    ("mr", 64, "3d_fullres"), ("xray", 64, "2d"), ("mr", 64, "2d")]]
if len(sys.argv) > 1:
    cases = [c for c in cases if f"{c[0]}:{c[1]}:{c[2]}" in sys.argv[1:]]
fps = {"ct": ct_fingerprint, "mr": mr_fingerprint, "xray": xray_fingerprint}
out = []
for kind, target, name in cases:
    plan = plan_experiment(fps[kind](), dataset_json(), gpu_memory_target_gib=target)
    c = plan["configurations"][name]
    net, patch, batch = c["network"], c["patch_size"], c["batch_size"]
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    model = build_network(net).cuda()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if compile_ else model
    t0 = time.time()
    for step in range(3):
        x = torch.randn(batch, net["in_channels"], *patch, device="cuda")
        t = torch.randint(0, 1000, (batch,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = fwd(x, t)
        loss = F.mse_loss(pred.float(), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-3)
    torch.cuda.synchronize()
    est = estimate_training_vram(net, patch, batch)
    row = dict(case=f"{kind}:{target}:{name}", patch=patch, batch=batch, target=target,
               estimate=round(est.total_gib, 3), static=round(est.static_gib, 3), act=round(est.activations_gib, 3),
               attn=round(est.attention_scores_gib, 3), workspace=est.workspace_gib,
               activation_scale=memory.DEFAULT_MEMORY_MODEL.activation_scale(net["spatial_dims"]),
               reserved=round(torch.cuda.max_memory_reserved() / 2**30, 3),
               allocated=round(torch.cuda.max_memory_allocated() / 2**30, 3), compile=compile_,
               sec=round(time.time() - t0, 1))
    row["reserved_over_target"] = round(row["reserved"] / target, 3)
    row["reserved_over_estimate"] = round(row["reserved"] / row["estimate"], 3)
    print(json.dumps(row), flush=True)
    out.append(row)
    del model, ema, opt, fwd
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"measure_{'compiled' if compile_ else 'eager'}.json"), "w"), indent=1)
