#!/usr/bin/env bash
# Every GPU check in one go, in a few minutes (a lent GPU's time is short):
#   1. the training-step benchmark against the paper's JAX LRU -> bench_results/gpu_train.*,
#      and where the sCIFAR step's time goes -> bench_results/gpu_profile_scifar.md
#   2. the Triton kernels against their references on CUDA, and the tests marked gpu
#   3. a default `train --device cuda --reduce tau=0.04` run on MNIST-1D
#   4. a GPU profile: energy per width over NVML windows of >= 1 s, with error bounds
#   5. `train --arch mamba --reduce tau=0.1` on the GPU (the Mamba block on the S6 Triton kernel)
#   6. the budgeted job with --device cuda (trials train on the GPU; latency is onnxruntime's)
# Usage: benchmarks/gpu_check.sh [PEER_ROOT]   (PEER_ROOT: a checkout of
# camail-official/compressm; default ../shared/peers/compressm-official). With $OUT set (the
# device tool), logs and results are copied there too. Each step is time-boxed; a failing step
# is reported and the next one still runs; the exit status counts the failed steps.
# SKIP="tune train" leaves those steps out (a rerun of what failed).
set -uo pipefail
cd "$(dirname "$0")/.."
PEER=${1:-../shared/peers/compressm-official}
DEST=${OUT:-bench_results/gpu_check}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "== $name: skipped" | tee -a "$LOG"; return; fi
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu,utilization.gpu \
    --format=csv; python -c "import torch, triton; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'triton', triton.__version__)"; } 2>&1 | tee -a "$LOG"
# the C kernels are the CPU reference the CUDA network is compared with
python setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "C kernels not built" | tee -a "$LOG"

step bench 240 python benchmarks/bench_gpu_train.py --peer-root "$PEER"
step profile 60 python benchmarks/bench_gpu_train.py --profile scifar:ours-bf16
step tests 150 python -m pytest -q -m "gpu or triton" tests/ -p no:cacheprovider
# energy per width from NVML over >= 1 s windows, with each figure's stated error bound
step energy 120 python -m compressm_tune.cli profile --device cuda --widths 16,64,256,1024 \
    --hidden 64 --blocks 4 --seq-len 256 --rounds 5 --min-time-s 0.2 --quiet \
    --out runs/gpu-profile.json
step train 90 python -m compressm_tune.cli train --device cuda --reduce tau=0.04 --no-progress \
    --out runs/gpu-train
step mamba 90 python -m compressm_tune.cli train --device cuda --arch mamba --state-dim 64 \
    --steps 300 --reduce tau=0.1 --no-progress --out runs/gpu-mamba
step tune 150 python -m compressm_tune.cli --budget-ms 5 --device cuda --trials 3 --steps 150 \
    --no-drift-check --out runs/gpu-tune
cp bench_results/gpu_train.json bench_results/gpu_train.md bench_results/gpu_profile_scifar.md \
    "$DEST"/ 2>/dev/null
cp runs/gpu-profile.json "$DEST"/gpu_profile_energy.json 2>/dev/null
cp runs/gpu-train/summary.json "$DEST"/train_summary.json 2>/dev/null
cp runs/gpu-mamba/summary.json "$DEST"/mamba_summary.json 2>/dev/null
cp runs/gpu-tune/report.md "$DEST"/tune_report.md 2>/dev/null
echo "gpu_check: $failed step(s) failed" | tee -a "$LOG"
exit "$failed"
