"""Tensor parallelism on 8 fake CPU devices, and a 2-process jax.distributed run."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tiny_models import make_model

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "parallel_worker.py")


def run_worker(args, devices, extra_env=None, timeout=600):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def report_of(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    line = next(l for l in out.splitlines() if l.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def started_together(tmp_path_factory, name, models):
    """{key: BackgroundWorker}: the workers of one parametrized test, started at once on
    its first case (one on each CPU core); ``models`` is {key: (family, make_model options,
    worker arguments after the model directory, "{directory}" standing for the worker's own)}."""
    workers = {}
    for key, (family, options, args) in models.items():
        directory = tmp_path_factory.mktemp(f"{name}_{key}")
        make_model(directory / "model", family, **options)
        args = [arg.format(directory=directory) for arg in args]
        workers[key] = BackgroundWorker([WORKER, args[0], str(directory / "model"), *args[1:]], 8, directory)
    return workers


@pytest.fixture(scope="module")
def tp_degree_workers(tmp_path_factory):
    workers = started_together(tmp_path_factory, "tp", {
        kv_heads: ("llama", dict(num_attention_heads=8, num_key_value_heads=kv_heads), ["tp", "1,2,4,8"])
        for kv_heads in (4, 1)})
    yield workers
    for worker in workers.values():
        worker.close()


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["gqa", "mqa"])
def test_tensor_parallel_degrees_agree(tp_degree_workers, kv_heads):
    report = tp_degree_workers[kv_heads].report()
    base = report["1"]
    for tp in ("2", "4", "8"):
        r = report[tp]
        assert r["tokens"] == base["tokens"], f"tp={tp}"
        ref = np.array(base["logits"])
        rel = np.linalg.norm(np.array(r["logits"]) - ref) / np.linalg.norm(ref)
        assert rel < 1e-5, f"tp={tp}: logits differ by {rel:.1e}"
        assert r["problems"] == [], r["problems"]
        # q/k/v fused KV-head-major: [embed, KV heads, group + 2, head_dim], split over KV heads.
        assert r["q_sharding"] in ("P(None, 'tp')", "PartitionSpec(None, 'tp')")
        # The KV pool is split over the devices by KV heads (replicated heads when TP > KV heads).
        assert r["kv_heads"] == max(kv_heads, int(tp))
        assert r["kv_shard_heads"] == [r["kv_heads"] // int(tp)]
        # The decode step's communication: the row-parallel o and down projections' two
        # all-reduces per layer, the vocab-parallel embedding's one, and one all-gather
        # of the logits for the sampler (which runs replicated: no collectives of its own).
        assert r["collectives"] == {"all-reduce": 2 * r["num_layers"] + 1, "all-gather": 1}, r["collectives"]
    assert base["collectives"] == {}


class BackgroundWorker:
    """A worker started ahead of the test that reads its report (output to files, so
    that nothing waits on a full pipe): it runs while the test process runs the tests
    before it, each process on one of the CPU cores."""

    def __init__(self, args, devices, directory, extra_env=None):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update(extra_env or {})
        self.out, self.err = open(os.path.join(directory, "stdout"), "w+"), open(os.path.join(directory, "stderr"), "w+")
        self.proc = subprocess.Popen([sys.executable, *args], env=env, stdout=self.out, stderr=self.err, text=True)

    def report(self, timeout=600):
        returncode = self.proc.wait(timeout=timeout)
        self.out.seek(0)
        self.err.seek(0)
        assert returncode == 0, self.err.read()[-4000:]
        line = next(l for l in self.out.read().splitlines() if l.startswith("REPORT "))
        return json.loads(line[len("REPORT "):])

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()


def selected(request, test_name):
    """Whether the session runs ``test_name`` (a fixture starting its worker early asks)."""
    return any(item.name == test_name for item in request.session.items)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    make_model(tmp_path, "llama", num_attention_heads=8, num_key_value_heads=4)
    single = report_of(run_worker(["tp", str(tmp_path), "1"], devices=1))
    port = free_port()
    procs = [run_worker(["multihost", str(tmp_path), "8"], devices=4, extra_env={
        "LMIDIST_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "LMIDIST_NUM_PROCESSES": "2",
        "LMIDIST_PROCESS_ID": str(i)}) for i in range(2)]
    leader = report_of(procs[0])
    out, err = procs[1].communicate(timeout=600)
    assert procs[1].returncode == 0 and "FOLLOWER DONE" in out, err[-4000:]
    assert leader["devices"] == 8 and leader["processes"] == 2
    assert leader["tokens"] == single["1"]["tokens"]


@pytest.fixture(scope="module")
def orbax_workers(tmp_path_factory):
    workers = started_together(tmp_path_factory, "orbax", {
        family: (family, {"num_attention_heads": 8, "num_key_value_heads": 2} if family == "llama" else {},
                 ["orbax", "{directory}/converted"])
        for family in ("llama", "decilm")})
    yield workers
    for worker in workers.values():
        worker.close()


@pytest.mark.parametrize("family", ["llama", "decilm"])
def test_orbax_round_trip_onto_other_meshes(orbax_workers, family):
    """Parameters converted on TP=2 and saved with orbax restore identically on TP=4
    (KV heads replicated) and TP=1. DeciLM's layers have 4, 1 and 2 KV heads: each layer
    is replicated (TP 2: 4, 2, 2; TP 4: 4, 4, 4) and folded back on its own."""
    report = orbax_workers[family].report()
    for tp in (4, 1):
        assert report[f"tp{tp}_identical"], tp
        assert report[f"tp{tp}_tokens"] == report[f"tp{tp}_direct_tokens"]
        assert "tp" in report[f"tp{tp}_q_sharding"]
