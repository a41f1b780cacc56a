#!/usr/bin/env bash
# The MNI152 GPU runs of issues 4-7 as a few `run` calls (documentation/benchmarks.md, "Still to run").
#
#   bash benchmarks/mni_gpu_session.sh prepare            # here: npz datasets 010-016 + wheels (~25 MB + ~2 MB)
#   bash benchmarks/mni_gpu_session.sh setup              # GPU: install wheels, plan + preprocess, gpu configs
#   bash benchmarks/mni_gpu_session.sh train GROUPS SECONDS    # GPU: trainings of GROUPS in parallel (resumable)
#   bash benchmarks/mni_gpu_session.sh evaluate GROUPS SECONDS # GPU: predictions + evaluations, each under timeout
#   bash benchmarks/mni_gpu_session.sh throughput         # GPU: issue-4 throughput pair, alone on the GPU
#   bash benchmarks/mni_gpu_session.sh jobs GROUPS          # anywhere: the trainings a train step would start
#   bash benchmarks/mni_gpu_session.sh memory SECONDS [PHASE ...]  # GPU: issue-7 memory of the planned latent steps (8/24/64 GiB)
#   bash benchmarks/mni_gpu_session.sh memory_phases [PHASE ...]   # anywhere: the memory cases, one phase per line
#
# GROUPS: comma-separated of 5 (reconstruction / denoising / translation; 5d: denoising only), 6 (anomaly
# strategies, segmentation; 6a: anomaly only, 6s: segmentation only), 7 (latent 3D + pixel 3D timing + memory of
# the latent plan; evaluate 7a: autoencoder held-out + the short pixel 3D training, which may share the GPU
# with a training; 7t: latent then pixel sampling, timed alone). A memory PHASE is a comma-separated list of
# cases of benchmarks/memory_plan.py (mr:24:3d_latent:ae, ...) run in parallel. Steps started side by side
# (each with its own OUT) need `setup` run once before them on a cold machine. Each `run` call carries
# .device_carry and .whl and begins with `bash benchmarks/mni_gpu_session.sh setup`, which is quick
# (~10 s) and skips what the warm machine already has. Work goes to .device_work/ (ignored; kept
# between calls while the machine stays warm), results and logs to $OUT (or ./kit_out), packed at the end of
# each step into one archive $OUT/<step>_<groups>.tgz (the device tool returns at most 8 files).
# SCALE=tiny DEVICE=cpu runs the same steps with the 2d_tiny / 3d_latent_tiny configurations: the
# CPU dry run that finds crashes before device time is spent.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARRY=$ROOT/.device_carry
WORK=${WORK:-$ROOT/.device_work}
OUT=${OUT:-$ROOT/kit_out}
SCALE=${SCALE:-gpu}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}:/tmp/site
export nnDiff_raw=$WORK/raw nnDiff_preprocessed=$WORK/pre nnDiff_results=$WORK/res
export PYTHONUNBUFFERED=1 nnDiff_n_proc_DA=${nnDiff_n_proc_DA:-2}
CFG2=2d_$SCALE
CFG3=3d_latent_$SCALE
# The entry points, with SimpleITK made unimportable: the GPU machine has none, the CPU dry run must not use it.
PY=(python3 -c "import sys, importlib; sys.modules['SimpleITK'] = None; m, f = sys.argv.pop(1).split(':'); sys.exit(getattr(importlib.import_module(m), f)())")
TRAIN=("${PY[@]}" nndiff.run.train:train_entry)
PREDICT=("${PY[@]}" nndiff.inference.cli:predict_entry)
EVALUATE=("${PY[@]}" nndiff.run.evaluate:evaluate_folder_entry)
EVAL_AE=("${PY[@]}" nndiff.run.evaluate_autoencoder:evaluate_autoencoder_entry)

log() { echo "[$(date +%H:%M:%S)] $*"; }

if [ "$DEVICE" = cpu ]; then  # dry run: every Python process of the kit without SimpleITK, as on the GPU machine
    mkdir -p "$WORK/no_simpleitk"
    echo 'raise ImportError("SimpleITK is blocked for the dry run (the GPU machine has none)")' \
        > "$WORK/no_simpleitk/SimpleITK.py"
    export PYTHONPATH=$WORK/no_simpleitk:$PYTHONPATH
fi

prepare() {
    rm -rf "$CARRY"; mkdir -p "$CARRY/raw"
    local c=(python3 -m nndiff.dataset_conversion.mni152 -o "$CARRY/raw" --file_ending .npz)
    "${c[@]}" -d 10
    "${c[@]}" -d 11 --task reconstruction
    "${c[@]}" -d 12 --task denoising
    "${c[@]}" -d 13 --task translation
    "${c[@]}" -d 14 --task anomaly_detection --seed 0
    "${c[@]}" -d 15 --task segmentation
    "${c[@]}" -d 16 --mode 3d --slab_size 200 --heldout_position end
    mkdir -p "$ROOT/.whl"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$ROOT/.whl" batchgenerators monai==1.6.1 || log "wheel download failed: carry .whl by hand (device/README.md)"
    du -sh "$CARRY" "$ROOT/.whl"
}

setup() {
    if [ -d "$ROOT/.whl" ] && ! python3 -c "import batchgenerators" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$ROOT"/.whl/*.whl
    fi
    if [ ! -d "$WORK/pre" ]; then
        mkdir -p "$WORK"; cp -r "$CARRY/raw" "$WORK/raw"
        "${PY[@]}" nndiff.run.plan_and_preprocess:plan_and_preprocess_entry -d 10 11 12 13 14 15 16 \
            --gpu_memory_target 24 -q
        python3 "$ROOT/benchmarks/mni_configs.py" "$WORK/pre" "$SCALE"
    fi
    mkdir -p "$OUT" "$WORK/logs"
    log "setup done: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "$DEVICE")"
}

# JOBS: "group dataset config fold trainer"
jobs_of() {
    local groups=",$1,"
    [[ $groups == *,5,* ]] && printf '%s\n' "5 11 $CFG2 0 ReconstructionTrainer" "5 13 $CFG2 0 TranslationTrainer"
    [[ $groups == *,5,* || $groups == *,5d,* ]] && printf '%s\n' "5 12 $CFG2 0 DenoisingTrainer"
    [[ $groups == *,6,* || $groups == *,6a,* ]] && printf '%s\n' "6 14 $CFG2 1 AnomalyDDPMTrainer" \
        "6 14 $CFG2 1 AnomalyCDPMTrainer" "6 14 $CFG2 1 AnomalyClassifierTrainer"
    [[ $groups == *,6,* || $groups == *,6s,* ]] && printf '%s\n' "6 15 $CFG2 0 SegmentationDiffusionTrainer" \
        "6 15 $CFG2 0 SegmentationBaselineTrainer"
    [[ $groups == *,7,* ]] && printf '%s\n' "7 16 $CFG3 all LatentDiffusionTrainer"
    return 0
}

model_dir() {  # dataset config trainer
    echo "$(ls -d "$nnDiff_results"/Dataset0"$1"_*)/$3__nnDiffPlans__$2"
}

train() {
    local groups=$1 seconds=$2 pids=()
    while read -r group id config fold trainer; do
        [ -z "$group" ] && continue
        local folder resume=()
        folder=$(ls -d "$nnDiff_results"/Dataset0"$id"_* 2>/dev/null || true)
        [ -n "$folder" ] && [ -e "$folder/${trainer}__nnDiffPlans__$config/fold_$fold/checkpoint_latest.pth" ] && resume=(--continue)
        log "train $id $config $fold $trainer ${resume[*]:-}"
        "${TRAIN[@]}" "$id" "$config" "$fold" -tr "$trainer" --time_limit "$seconds" -device "$DEVICE" "${resume[@]}" \
            > "$WORK/logs/train_${id}_$trainer.log" 2>&1 &
        pids+=($!)
    done < <(jobs_of "$groups")
    local status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    collect
    log "trainings finished (status $status)"
    return $status
}

under() {  # seconds name command...: one evaluation step with its own limit, logged, failures reported
    local seconds=$1 name=$2; shift 2
    log "start $name"
    if timeout "$seconds" "$@" > "$WORK/logs/$name.log" 2>&1; then log "done $name"; else log "FAILED/TIMEOUT $name (log: $name.log)"; fi
    tail -n 8 "$WORK/logs/$name.log" || true
}

evaluate_5() {  # seconds [family ids, default 11 12 13]
    local s=$1 k=4 limit=() ids=("${@:2}")
    [ ${#ids[@]} -eq 0 ] && ids=(11 12 13)
    [ "$SCALE" = tiny ] && k=1
    [ -n "${MAX_CASES:-}" ] && limit=(--max_cases "$MAX_CASES")  # the first N held-out cases
    local fa=(python3 "$ROOT/benchmarks/family_arrays.py")
    declare -A family=([11]=reconstruction [12]=denoising [13]=translation) \
        trainer=([11]=ReconstructionTrainer [12]=DenoisingTrainer [13]=TranslationTrainer) samples=([11]=$k [12]=$k [13]=$((2 * k)))
    for id in "${ids[@]}"; do
        "${fa[@]}" pack "$(ls -d "$nnDiff_raw"/Dataset0"$id"_*)" "$WORK/pack$id.npz" > /dev/null
        under "$s" "eval_$id" "${fa[@]}" "${family[$id]}" "$(model_dir "$id" "$CFG2" "${trainer[$id]}")" "$WORK/pack$id.npz" \
            "$OUT/eval_$id" -n "${samples[$id]}" -chk checkpoint_best.pth -device "$DEVICE" "${limit[@]}" &
    done
    wait
}

evaluate_6a() {
    local s=$1 raw14 calib=$WORK/calib14 steps=() chk="-chk checkpoint_latest.pth"
    # Time-limited trainings write no checkpoint_final.pth: predict with the latest one.
    # The plan's DDPM has 1000 steps (AnoDDPM then takes 250 per window, 9 windows of 128² per 1 mm slice,
    # 43 slices with calibration): 100 respaced steps fit the call; the threshold is calibrated with the same.
    [ "$SCALE" = gpu ] && steps=(--steps "${ANOMALY_STEPS:-100}")
    raw14=$(ls -d "$nnDiff_raw"/Dataset014_*)
    # Threshold calibration on fold 1's validation cases (7 lesioned + 9 healthy), never on imagesTs.
    rm -rf "$calib"; mkdir -p "$calib/imagesTr" "$calib/labelsTr"
    python3 - "$nnDiff_preprocessed" "$raw14" "$calib" <<'EOF'
import json, pathlib, sys
pre, raw, calib = (pathlib.Path(a) for a in sys.argv[1:])
val = json.loads(next(pre.glob("Dataset014_*/splits_final.json")).read_text())[1]["val"]
for case in val:
    for src in list((raw / "imagesTr").glob(f"{case}_0000.*")) + list((raw / "labelsTr").glob(f"{case}.*")):
        (calib / src.parent.name / src.name).symlink_to(src)
EOF
    for strategy in anoddpm cdpm wolleb; do
        local trainer=AnomalyDDPMTrainer
        [ "$strategy" = cdpm ] && trainer=AnomalyCDPMTrainer
        [ "$strategy" = wolleb ] && trainer=AnomalyCDPMTrainer  # guides the all-cases (CDPM null-token) model
        under "$s" "anomaly_$strategy" bash -c "$(printf '%q ' "${PREDICT[@]}") -d 14 -c $CFG2 -tr $trainer -f 1 $chk \
            -i $raw14/imagesTs -o $OUT/anomaly_$strategy --anomaly_strategy $strategy -device $DEVICE ${steps[*]:-} \
            --calibrate_threshold $calib/imagesTr $calib/labelsTr && $(printf '%q ' "${EVALUATE[@]}") \
            $raw14/labelsTs $OUT/anomaly_$strategy -d 14 --images $raw14/imagesTs --training $raw14/imagesTr" &
    done
    wait
}

evaluate_6s() {
    local s=$1 raw15 chk="-chk checkpoint_latest.pth"
    raw15=$(ls -d "$nnDiff_raw"/Dataset015_*)
    under "$s" seg_diffusion bash -c "$(printf '%q ' "${PREDICT[@]}") -d 15 -c $CFG2 -tr SegmentationDiffusionTrainer \
        -f 0 $chk -i $raw15/imagesTs -o $OUT/seg_diffusion -device $DEVICE" &
    under "$s" seg_baseline bash -c "$(printf '%q ' "${PREDICT[@]}") -d 15 -c $CFG2 -tr SegmentationBaselineTrainer \
        -f 0 $chk -i $raw15/imagesTs -o $OUT/seg_baseline -device $DEVICE" &
    wait
    under 300 seg_evaluate "${EVALUATE[@]}" "$raw15/labelsTs" "$OUT/seg_diffusion" -d 15 --baseline "$OUT/seg_baseline"
}

evaluate_7() {  # seconds [parts: a t m, default all three]
    local s=$1 parts=" ${*:2} "
    [ "$parts" = "  " ] && parts=" a t m "
    [[ $parts == *" a "* ]] && evaluate_7a "$s"
    [[ $parts == *" t "* ]] && evaluate_7t "$s"
    [[ $parts == *" m "* ]] && memory_7 "$s"
    return 0
}

pixel_config() { if [ "$SCALE" = tiny ]; then echo 2d_tiny; else echo 3d_fullres; fi; }

evaluate_7a() {  # seconds: what may share the GPU with a training (no timing is read from it)
    local s=$1 pixel
    pixel=$(pixel_config)
    # The autoencoder ceiling (held-out PSNR/SSIM), and a pixel-space 3D model of a few iterations at
    # its planned patch: enough to time sampling and measure its memory, both independent of quality.
    under "$s" autoencoder_heldout "${EVAL_AE[@]}" -d 16 -c "$CFG3" -f all -device "$DEVICE" \
        -o "$OUT/autoencoder_evaluation.json" &
    under "$s" pixel_train "${TRAIN[@]}" 16 "$pixel" all --iterations 10 -device "$DEVICE" &
    wait
}

evaluate_7t() {  # seconds: seconds per volume, latent vs pixel, one after the other, alone on the GPU
    local s=$1 n=2 pixel kind
    pixel=$(pixel_config)
    [ "$SCALE" = tiny ] && n=1
    # The volumes stay in $WORK (two 1 mm volumes are more than the device tool returns); $OUT gets their
    # timing/info JSON and a preview (orthogonal mid-slices + statistics, benchmarks/volume_preview.py).
    # checkpoint_latest: a training stopped by its time limit has no checkpoint_final (session 10).
    under "$s" latent_samples "${PREDICT[@]}" -d 16 -c "$CFG3" -tr LatentDiffusionTrainer -f all -chk checkpoint_latest.pth \
        -o "$WORK/latent_samples" --num_samples "$n" --shape median -device "$DEVICE"
    under "$s" pixel_samples "${PREDICT[@]}" -d 16 -c "$pixel" -tr GenerationTrainer -f all \
        -o "$WORK/pixel_samples" --num_samples 1 --shape patch -device "$DEVICE"
    for kind in latent pixel; do
        mkdir -p "$OUT/${kind}_samples"
        cp "$WORK/${kind}_samples"/*.json "$OUT/${kind}_samples/" 2>/dev/null || true
    done
    under 120 latent_preview python3 "$ROOT/benchmarks/volume_preview.py" "$WORK/latent_samples" \
        "$OUT/latent_samples/preview.png" --reference "$(ls "$nnDiff_raw"/Dataset016_*/imagesTs/*.npz | head -1)"
}

memory_phases() {  # [PHASE ...]: the memory cases, one line per phase (a phase's cases run in parallel)
    if [ $# -gt 0 ]; then printf '%s\n' "${@//,/ }"; return 0; fi
    local gib
    if [ "$SCALE" = tiny ]; then echo "mr:8:3d_latent mr:8:3d_latent:ae"; return 0; fi  # dry run (smoke mode)
    # Default: the 8 / 24 GiB cases together (at most 64 GiB), then each 64 GiB case alone; on a card
    # with >= 128 GiB (H200) the first 64 GiB case joins the parallel phase.
    gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 || echo 0)
    if [ "$((${gib:-0} / 1024))" -ge 128 ]; then
        printf '%s\n' "mr:8:3d_latent mr:8:3d_latent:ae mr:24:3d_latent mr:24:3d_latent:ae mr:64:3d_latent" \
            "mr:64:3d_latent:ae"
    else
        printf '%s\n' "mr:8:3d_latent mr:8:3d_latent:ae mr:24:3d_latent mr:24:3d_latent:ae" "mr:64:3d_latent" \
            "mr:64:3d_latent:ae"
    fi
}

memory_7() {  # seconds [PHASE ...]: issue 7's memory of the planned autoencoder and latent steps (no model needed)
    local s=$1 phase case
    local mp=(env COMPILE=1 python3 "$ROOT/benchmarks/memory_plan.py")
    [ "$DEVICE" = cuda ] || mp=(env DEVICE=cpu SMOKE=1 python3 "$ROOT/benchmarks/memory_plan.py")
    # One process per case (per-process allocator peaks); phases one after another.
    while read -r phase; do
        for case in $phase; do under "$s" "memory_${case//:/_}" "${mp[@]}" "$case" & done
        wait
    done < <(memory_phases "${@:2}")
}

evaluate() {
    local groups=",$1,"
    [[ $groups == *,5,* ]] && evaluate_5 "$2" &
    [[ $groups == *,5d,* && $groups != *,5,* ]] && evaluate_5 "$2" 12 &
    [[ $groups == *,6,* || $groups == *,6a,* ]] && evaluate_6a "$2" &
    [[ $groups == *,6,* || $groups == *,6s,* ]] && evaluate_6s "$2" &
    [[ $groups == *,7,* ]] && evaluate_7 "$2" &
    [[ $groups == *,7a,* && $groups != *,7,* ]] && evaluate_7 "$2" a &
    [[ $groups == *,7t,* && $groups != *,7,* ]] && evaluate_7 "$2" t &
    wait
    collect
}

collect() {  # logs, progress plots and summaries of every model into $OUT (small files only)
    mkdir -p "$OUT/models"
    cp "$WORK"/logs/*.log "$OUT/" 2>/dev/null || true
    find "$nnDiff_results" -maxdepth 4 \( -name 'progress.png' -o -name 'training_log_*.txt' -o -name 'autoencoder.json' \
        -o -name 'samples_epoch_*.png' \) 2>/dev/null | while read -r f; do
        local rel=${f#"$nnDiff_results"/}
        mkdir -p "$OUT/models/$(dirname "$rel")"; cp "$f" "$OUT/models/$rel"
    done
}

pack_out() {  # the device tool returns at most 8 files, 2 folders down: everything under $OUT goes into one archive
    local name=$1 tmp
    tmp=$(mktemp -d)
    tar czf "$tmp/$name.tgz" -C "$OUT" --exclude='./*.tgz' .  # earlier steps' archives of this call stay beside it
    find "$OUT" -mindepth 1 -maxdepth 1 ! -name '*.tgz' -exec rm -rf {} +
    mv "$tmp/$name.tgz" "$OUT/"; rmdir "$tmp"
    log "results packed: $OUT/$name.tgz ($(du -h "$OUT/$name.tgz" | cut -f1))"
}

throughput() {  # one precision at a time: four children compiling at once ran out of an 80 GB card (session 7)
    local precision
    for precision in bf16 fp32; do
        python3 "$ROOT/benchmarks/train_throughput.py" --device "$DEVICE" --precisions "$precision" --parallel_compile \
            --output "$OUT/throughput_$precision"
    done
}

step=${1:-}
case "$step" in
    prepare) prepare ;;
    setup) setup ;;
    train) setup; status=0; train "${2:?GROUPS}" "${3:?SECONDS}" || status=$?; pack_out "train_${2//,/_}"; exit $status ;;
    evaluate) setup; evaluate "${2:?GROUPS}" "${3:?SECONDS}"; pack_out "evaluate_${2//,/_}" ;;
    jobs) jobs_of "${2:?GROUPS}" ;;
    memory) setup; memory_7 "${2:?SECONDS}" "${@:3}"; collect; pack_out memory ;;
    memory_phases) memory_phases "${@:2}" ;;
    throughput) setup; status=0; throughput || status=$?; pack_out throughput; exit $status ;;
    *) sed -n '2,24p' "$0"; exit 2 ;;
esac
