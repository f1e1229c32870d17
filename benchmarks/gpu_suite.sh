#!/usr/bin/env bash
# One device call = one run of this script: the GPU checks and benchmarks, logs and
# JSON results under $OUT (or benchmarks/results/gpu when run elsewhere).
#   bash benchmarks/gpu_suite.sh [stage ...]   stages: kernels latency throughput compare_hf tp
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(kernels latency throughput compare_hf)
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
run() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t=$(date +%s)
  timeout "$limit" "$@" --out "$OUT" 2>&1 | tail -n 400 > "$OUT/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]} after $(( $(date +%s) - t )) s"; tail -n 5 "$OUT/$name.log"
}
for stage in "${stages[@]}"; do
  case $stage in
    kernels) run kernels 240 python3 benchmarks/kernels.py ;;
    latency) run latency 300 python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=8 ;;
    latency1) run latency1 300 python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=1 ;;
    throughput) run throughput 540 python3 benchmarks/throughput.py --shape llama3-8b --dtype bf16 \
               --num-requests 1000 --input-len 1024 --output-len 128 --option max_rolling_batch_size=256 \
               --option max_rolling_batch_prefill_tokens=8192 --option max_model_len=2048 --option decode_steps=8 ;;
    compare_hf) run compare_hf 300 python3 benchmarks/compare_hf.py --shape llama3-8b --num-requests 1 \
               --input-len 128 --output-len 128 --option decode_steps=8 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
