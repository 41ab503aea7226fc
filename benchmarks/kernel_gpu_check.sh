#!/usr/bin/env bash
# GPU check of the Triton attention kernels: GPU tests, then the microbenchmark (markdown table last).
# Run from the repository root on a CUDA machine:  bash benchmarks/kernel_gpu_check.sh [--sweep]
# Logs go to $OUT (default /tmp/kernel_gpu_check). KERNELS_ISOLATE=1 imports nanovllm.kernels without
# running nanovllm/__init__.py (useful while the rest of the engine is still being written).
set -o pipefail
OUT=${OUT:-/tmp/kernel_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${KERNELS_ISOLATE:-0}" = 1 ]; then
  shim=$(mktemp -d)
  cat > "$shim/sitecustomize.py" <<'PY'
import os, sys, types
pkg = types.ModuleType("nanovllm")
pkg.__path__ = [os.path.join(os.getcwd(), "nanovllm")]
sys.modules["nanovllm"] = pkg
PY
  export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 400 python3 -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider -o markers=gpu \
  --durations=5 2>&1 | tee "$OUT/tests.log"
echo "tests exit: $?"
timeout 500 python3 benchmarks/attention_bench.py "$@" 2>&1 | tee "$OUT/bench.log"
