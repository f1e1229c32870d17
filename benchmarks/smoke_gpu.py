import os, sys, time, types
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
import numpy as np, jax, jax.numpy as jnp
from benchmarks.common import SHAPES
from benchmarks.latency import copy_bandwidth, matmul_flops
from lmidist_jax import SamplingParams, parallel
from lmidist_jax.engine.factory import engine_for_model
from lmidist_jax.models.loader import random_model
from lmidist_jax.models.spec import spec_from_hf_config
print(jax.devices(), flush=True)
bw = copy_bandwidth(); print("copy GB/s", bw/1e9, "matmul TF/s", matmul_flops()/1e12, flush=True)
spec = spec_from_hf_config(SHAPES["llama3-8b"])
t=time.time()
model = random_model(spec, dtype=jnp.bfloat16, mesh=parallel.make_mesh(1), max_model_len=2048)
print("init", time.time()-t, model.num_parameter_bytes/1e9, "GB", flush=True)
for bsz, K in [(1, 8), (64, 8), (64, 1)]:
    ec = types.SimpleNamespace(block_size=16, max_rolling_batch_size=bsz, max_rolling_batch_prefill_tokens=1024, num_kv_blocks=4000, kv_cache_memory_gb=None,
        attention_backend="xla", max_logprobs=20, enforce_eager=False, enable_prefix_caching=False, seed=0, tensor_parallel_degree=1, gpu_memory_utilization=0.9, decode_steps=K)
    t=time.time(); eng = engine_for_model(model, None, ec, max_model_len=2048, progress=False); print(f"bsz {bsz} K {K} compile {time.time()-t:.1f}s", flush=True)
    rng=np.random.default_rng(0)
    for rep in range(2):
        for i in range(bsz): eng.add_request(f"{rep}-{i}", list(map(int, rng.integers(10,1000,128))), SamplingParams(max_new_tokens=128, ignore_eos=True))
        eng.stats.__init__()
        times=[]; t0=time.time()
        while eng.has_unfinished_requests():
            outs = eng.step(); times.append(time.time())
        st=eng.stats
        el=time.time()-t0
        print(f"  rep {rep}: {bsz*128/el:.1f} out tok/s, steps {st.num_steps}, host {1e3*(st.host_time+st.schedule_time+st.postprocess_time)/st.num_steps:.2f} ms/step, device {1e3*st.device_time/st.num_steps:.2f} ms/step, per-token {1e3*el/128:.2f} ms", flush=True)
    del eng
