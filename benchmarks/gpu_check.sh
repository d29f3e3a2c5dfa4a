#!/usr/bin/env bash
# Every GPU measurement of the speed issue in one run (about 7 minutes on one H100 expected; the stage
# limits add up to 10 min 55 s at worst):
#   1. epoch time, images/s and MFU of SimCLR, BYOL and MoCo v2 on the user's fast path: CIFAR-style
#      ResNet-18, batch 512, bf16-mixed, channels_last, fused optimizer, CIFAR10DataModule(in_memory=True,
#      gpu_augment=True, resident_device="cuda") (the images held on the GPU as uint8, the library's
#      GPUAugment making the views there), trained by Trainer.fit;
#   2. the same for SimCLR with a compiled backbone;
#   3. library overhead on the GPU: bare PyTorch loop vs Trainer (train_throughput.py), same settings;
#   4. view batching: one forward over both views against one forward per view (SimCLR, BYOL);
#   5. the fast-path options one at a time for SimCLR (fp32 / +bf16 / +channels_last / +fused).
# Usage: benchmarks/gpu_check.sh [--smoke]     (--smoke: tiny CPU settings, checks that it all runs)
# Results: printed, and JSON files under $OUT (default outputs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
failed=0
stage() {  # stage <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2> "$OUT/$name.stderr"
  local rc=$?
  echo "-- $name: exit $rc, $((SECONDS - start)) s"
  if [ $rc -ne 0 ]; then failed=1; tail -n 20 "$OUT/$name.stderr"; fi
}

if [ "${1:-}" = "--smoke" ]; then
  TP=(--device cpu --batch-size 8 --image-size 32 --warmup 1 --steps 1 --threads 1)
  stage 300 epoch "$PY" -m benchmarks.gpu_epoch --smoke --json "$OUT/epoch.json"
  stage 300 overhead "$PY" -m benchmarks.train_throughput "${TP[@]}" --methods simclr mocov2 byol \
    --precision bf16-mixed --channels-last --fused --json "$OUT/overhead.json"
  exit $failed
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
stage 130 epoch "$PY" -m benchmarks.gpu_epoch --methods simclr byol mocov2 --batch-size 512 --epochs 2 \
  --json "$OUT/epoch.json"
stage 100 epoch_compiled "$PY" -m benchmarks.gpu_epoch --methods simclr --batch-size 512 --epochs 2 --compile --data random \
  --json "$OUT/epoch_compiled.json"
TP=(--device cuda --batch-size 512 --image-size 32 --warmup 10 --steps 40)
stage 110 overhead "$PY" -m benchmarks.train_throughput "${TP[@]}" --methods simclr mocov2 byol \
  --precision bf16-mixed --channels-last --fused --json "$OUT/overhead.json"
stage 90 view_batching_concat "$PY" -m benchmarks.train_throughput "${TP[@]}" --modes trainer --methods simclr byol \
  --precision bf16-mixed --channels-last --fused --view-batching concat --json "$OUT/view_batching_concat.json"
stage 90 view_batching_per_view "$PY" -m benchmarks.train_throughput "${TP[@]}" --modes trainer --methods simclr byol \
  --precision bf16-mixed --channels-last --fused --view-batching per_view --json "$OUT/view_batching_per_view.json"
stage 45 ablation_fp32 "$PY" -m benchmarks.train_throughput "${TP[@]}" --modes trainer --methods simclr --json "$OUT/ablation_fp32.json"
stage 45 ablation_bf16 "$PY" -m benchmarks.train_throughput "${TP[@]}" --modes trainer --methods simclr --precision bf16-mixed \
  --json "$OUT/ablation_bf16.json"
stage 45 ablation_bf16_cl "$PY" -m benchmarks.train_throughput "${TP[@]}" --modes trainer --methods simclr --precision bf16-mixed \
  --channels-last --json "$OUT/ablation_bf16_cl.json"
stage 120 decode "$PY" -m benchmarks.decode_benchmark --batch 256 --size 224 --upscale 500x375 --json "$OUT/decode.json"
exit $failed
