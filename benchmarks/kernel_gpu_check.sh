#!/usr/bin/env bash
# GPU check of our Triton kernels: GPU tests, the fused-kernel benchmark, the attention benchmark (bf16 KV, then
# fp8 KV when the kernels support it); markdown tables last. Run from the repository root on a CUDA machine:
#   bash benchmarks/kernel_gpu_check.sh [--sweep]        # all stages (~6-8 min on an H100)
#   STAGES="tests fused" bash benchmarks/kernel_gpu_check.sh
# Stages: tests (pytest -m gpu on the kernel test files), fused (benchmarks/fused_bench.py), attn (bf16 KV),
# attn-fp8 (fp8 KV). --sweep is passed to every benchmark. Logs go to $OUT (default /tmp/kernel_gpu_check).
set -o pipefail
OUT=${OUT:-/tmp/kernel_gpu_check}
STAGES=${STAGES:-tests fused attn attn-fp8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
for stage in $STAGES; do
  case $stage in
    tests)
      files=$(ls tests/test_kernels.py tests/test_fused_kernels.py tests/test_fp8_kernels.py 2>/dev/null)
      timeout 500 python3 -m pytest $files -m gpu -q -p no:cacheprovider -o markers=gpu --durations=8 2>&1 \
        | tee "$OUT/tests.log" || status=1 ;;
    fused) timeout 400 python3 -m benchmarks.fused_bench "$@" 2>&1 | tee "$OUT/fused.log" || status=1 ;;
    attn) timeout 500 python3 -m benchmarks.attention_bench "$@" 2>&1 | tee "$OUT/attn.log" || status=1 ;;
    attn-fp8)
      if grep -q -- "--kv-dtype" benchmarks/attention_bench.py; then
        timeout 500 python3 -m benchmarks.attention_bench --kv-dtype fp8 "$@" 2>&1 | tee "$OUT/attn_fp8.log" || status=1
      fi ;;
    *) echo "unknown stage $stage"; status=1 ;;
  esac
  echo "stage $stage done (status so far: $status)"
done
exit $status
