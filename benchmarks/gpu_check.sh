#!/usr/bin/env bash
# Every GPU check in one go, each step time-boxed (a lent GPU's time is short): the training
# step against the paper's JAX LRU and where the sCIFAR step's time goes; the Triton kernels
# and the tests marked gpu; `train --reduce tau=0.04` (LRU), `--arch mamba`, `--arch mamba2`
# (its chunked SSD and the Triton importance kernel on folded groups; then `--mamba2-scan fused`,
# the Triton selective kernel in training) and under torchrun (NCCL, one rank); Mamba-2's
# training step on the SSD vs the Triton kernel; a GPU energy profile over NVML windows; the
# budgeted job with --device cuda.
# Usage: benchmarks/gpu_check.sh [PEER_ROOT]  (a checkout of camail-official/compressm; default
# ../shared/peers/compressm-official). Results and the log go to $OUT (the device tool) or
# bench_results/gpu_check. SKIP="tune train" leaves steps out; ONLY="mamba2-fused mamba2-scan"
# runs just those (the step limits add up to more than one lent machine's 10-minute command, a
# ceiling each step rarely reaches; a short lease runs a subset). Exit status: failed steps.
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
    if [[ " ${SKIP:-} " == *" $name "* || ( -n "${ONLY:-}" && " $ONLY " != *" $name "* ) ]]; then
        echo "== $name: skipped" | tee -a "$LOG"; return
    fi
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu \
    --format=csv; python -c "import torch, triton; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'triton', triton.__version__)"; } 2>&1 | tee -a "$LOG"
# the C kernels are the CPU reference the CUDA network is compared with
python setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "C kernels not built" | tee -a "$LOG"

# a rerun starts afresh: train and profile refuse to overwrite an earlier run's output
rm -rf runs/gpu-train runs/gpu-mamba runs/gpu-mamba2 runs/gpu-mamba2-fused runs/gpu-tune \
    "$DEST/gpu_profile_energy.json"
step bench 240 python benchmarks/bench_gpu_train.py --peer-root "$PEER" --results-dir "$DEST"
step profile 60 python benchmarks/bench_gpu_train.py --profile scifar:ours-bf16 \
    --results-dir "$DEST"
step tests 150 python -m pytest -q -m "gpu or triton" tests/ -p no:cacheprovider
step energy 120 python -m compressm_tune.cli profile --device cuda --widths 16,64,256,1024 \
    --hidden 64 --blocks 4 --seq-len 256 --rounds 5 --min-time-s 0.2 --quiet \
    --out "$DEST/gpu_profile_energy.json"
step train 90 python -m compressm_tune.cli train --device cuda --reduce tau=0.04 --no-progress \
    --out runs/gpu-train
step mamba 90 python -m compressm_tune.cli train --device cuda --arch mamba --state-dim 64 \
    --steps 300 --reduce tau=0.1 --no-progress --out runs/gpu-mamba
step mamba2 90 python -m compressm_tune.cli train --device cuda --arch mamba2 --state-dim 128 \
    --steps 300 --reduce tau=0.1 --no-progress --out runs/gpu-mamba2
step mamba2-fused 60 python -m compressm_tune.cli train --device cuda --arch mamba2 \
    --state-dim 128 --steps 100 --reduce tau=0.1 --mamba2-scan fused --no-progress \
    --out runs/gpu-mamba2-fused
step mamba2-scan 90 python benchmarks/bench_mamba2_train.py --device cuda --repeats 5 \
    --results-dir "$DEST" --name mamba2_train_cuda
# the NCCL path: one rank under torchrun (process group, DDP re-wrapped after the cut at step 20)
step ddp 120 python -m torch.distributed.run --nproc-per-node 1 --master-port 29531 \
    -m compressm_tune.cli train --device cuda --reduce rank=32 --schedule window --window 0.5 \
    --steps 60 --eval-every 20 --no-progress --out runs/gpu-ddp
step tune 150 python -m compressm_tune.cli --budget-ms 5 --device cuda --trials 3 --steps 150 \
    --no-drift-check --out runs/gpu-tune
# one local worker per GPU (CUDA_VISIBLE_DEVICES each; round-robin when fewer GPUs than workers)
step tune-workers 200 python -m compressm_tune.cli --budget-ms 5 --device cuda --workers 2 \
    --trials 4 --steps 150 --no-drift-check --out runs/gpu-tune-workers
cp runs/gpu-train/summary.json "$DEST"/train_summary.json 2>/dev/null
cp runs/gpu-mamba/summary.json "$DEST"/mamba_summary.json 2>/dev/null
cp runs/gpu-mamba2/summary.json "$DEST"/mamba2_summary.json 2>/dev/null
cp runs/gpu-mamba2-fused/summary.json "$DEST"/mamba2_fused_summary.json 2>/dev/null
cp runs/gpu-ddp/summary.json "$DEST"/ddp_summary.json 2>/dev/null
cp runs/gpu-tune/report.md "$DEST"/tune_report.md 2>/dev/null
echo "gpu_check: $failed step(s) failed" | tee -a "$LOG"
exit "$failed"
