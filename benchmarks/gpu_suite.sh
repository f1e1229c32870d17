#!/usr/bin/env bash
# One device call = one run of this script: the GPU checks and benchmarks, logs and
# JSON results under $OUT (or benchmarks/results/gpu when run elsewhere).
#   bash benchmarks/gpu_suite.sh [stage ...]   stages: kernels latency throughput compare_hf tp_profile tp2 70b ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Leave CUDA/NCCL room outside the preallocated pool (a 2-GPU host ran out at 0.95).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
# Keep NVLink multicast off on shared multi-GPU hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(kernels latency throughput compare_hf)
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
run() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t=$(date +%s)
  timeout -k 5 "$limit" "$@" --out "$OUT" 2>&1 | tail -n 400 > "$OUT/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]} after $(( $(date +%s) - t )) s"; tail -n 5 "$OUT/$name.log"
}
for stage in "${stages[@]}"; do
  case $stage in
    kernels) run kernels 240 python3 benchmarks/kernels.py ;;
    latency) run latency 300 python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=8 ;;
    step_profile) run step_profile 420 python3 benchmarks/step_profile.py --shape llama3-8b --dtype bf16 ;;
    latency_default) run latency_default 300 python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --name latency-default ;;
    latency1) run latency1 300 python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=1 --name latency-k1 ;;
    spec_decode) run spec_decode 570 python3 benchmarks/spec_decode.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --k 4 --draft-layers 2 ;;
    throughput) run throughput 540 python3 benchmarks/throughput.py --shape llama3-8b --dtype bf16 \
               --num-requests 1000 --input-len 1024 --output-len 128 --option max_rolling_batch_size=256 \
               --option max_rolling_batch_prefill_tokens=8192 --option max_model_len=2048 --option decode_steps=8 ;;
    compare_hf) run compare_hf 300 python3 benchmarks/compare_hf.py --shape llama3-8b --num-requests 1 \
               --input-len 128 --output-len 128 ;;
    tp1) run latency_tp1 150 python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=8 --option tensor_parallel_degree=1 --name latency-tp1 ;;
    latency_cb) run latency_cb 150 env XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL \
               python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=8 --option tensor_parallel_degree=1 --name latency-cmdbuf ;;
    tp2_cb) run latency_tp2_cb 150 env XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL,COLLECTIVES \
               python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=8 --option tensor_parallel_degree=2 --name latency-tp2-cmdbuf ;;
    tp_profile) # TP=1 and TP=2 batch-1 decode steps in one call, with XLA's all-reduce variants at TP=2
               # (about 6 minutes: call it alone, the device tool stops a command at 10).
               run step_profile_tp1 420 python3 benchmarks/step_profile.py --shape llama3-8b --dtype bf16 \
               --option tensor_parallel_degree=1 --decode-steps 8 --variants default --skip-kernel-checks --name step_profile-tp1
               run step_profile_tp2 570 python3 benchmarks/step_profile.py --shape llama3-8b --dtype bf16 \
               --option tensor_parallel_degree=2 --decode-steps 8 \
               --variants default,ar_sync,ar_one_shot,nccl_symmetric,ar_overlap,cmdbuf_collectives \
               --profile default,ar_one_shot --skip-kernel-checks --name step_profile-tp2 ;;
    tp2) run latency_tp2 150 python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=8 --option tensor_parallel_degree=2 --name latency-tp2 ;;
    tp2_batch64) run throughput_tp2 300 python3 benchmarks/throughput.py --shape llama3-8b --dtype bf16 \
               --num-requests 64 --input-len 512 --output-len 128 --option max_rolling_batch_size=64 \
               --option max_model_len=1024 --option decode_steps=8 --option tensor_parallel_degree=2 --name throughput-tp2 ;;
    tp1_batch64) run throughput_tp1 300 python3 benchmarks/throughput.py --shape llama3-8b --dtype bf16 \
               --num-requests 64 --input-len 512 --output-len 128 --option max_rolling_batch_size=64 \
               --option max_model_len=1024 --option decode_steps=8 --name throughput-tp1 ;;
    batch64_k1) run throughput_b64_k1 200 python3 benchmarks/throughput.py --shape llama3-8b --dtype bf16 \
               --num-requests 64 --input-len 512 --output-len 128 --option max_rolling_batch_size=64 \
               --option max_model_len=1024 --option decode_steps=1 --option tensor_parallel_degree=1 --name throughput-b64-k1 ;;
    batch64_k8) run throughput_b64_k8 200 python3 benchmarks/throughput.py --shape llama3-8b --dtype bf16 \
               --num-requests 64 --input-len 512 --output-len 128 --option max_rolling_batch_size=64 \
               --option max_model_len=1024 --option decode_steps=8 --option tensor_parallel_degree=1 --name throughput-b64-k8 ;;
    latency_warm) run latency_warm 150 python3 benchmarks/latency.py --shape llama3-8b --dtype bf16 \
               --input-len 128 --output-len 256 --option decode_steps=8 --option tensor_parallel_degree=1 --name latency-warm-cache ;;
    70b) run latency_70b 540 python3 benchmarks/latency.py --shape llama2-70b --dtype bf16 \
               --input-len 128 --output-len 64 --option decode_steps=8 --option tensor_parallel_degree=max --name latency-70b ;;
    70b_batch16) run throughput_70b_b16 540 python3 benchmarks/throughput.py --shape llama2-70b --dtype bf16 \
               --num-requests 16 --input-len 128 --output-len 128 --option max_rolling_batch_size=16 \
               --option max_model_len=512 --option decode_steps=8 --option tensor_parallel_degree=max --name throughput-70b-b16 ;;
    70b_load) # 16 of the 80 layers: the checkpoint and its orbax copy must both fit the disk.
               run orbax_70b 540 python3 benchmarks/orbax_cache.py --random llama2-70b --num-layers 16 \
               --tensor-parallel-degree 2 --repeats 1 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
