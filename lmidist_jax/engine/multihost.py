"""Multi-host serving with JAX's own multi-controller runtime.

Every process runs the same program over one global mesh. Process 0 owns the
scheduler (and the server); before each step it broadcasts the packed batch, and the
other processes ("followers") run the same jitted step on it. No RPC layer of our own.

Environment (read by ``initialize_from_env``; JAX's own JAX_* names work too):
  LMIDIST_COORDINATOR_ADDRESS   host:port of process 0's coordinator
  LMIDIST_NUM_PROCESSES         number of processes (one per host)
  LMIDIST_PROCESS_ID            this process's index, 0 .. N-1
  LMIDIST_LOCAL_DEVICE_IDS      optional comma-separated local device ids
On CPU the collectives go through gloo.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger("lmidist_jax")

_HEADER_SIZE = 5  # [num_tokens, num_seqs, decode_only, stop, num_steps]


def initialize_from_env(environ=None) -> bool:
    """Calls jax.distributed.initialize when the environment asks for several processes.
    Returns True when running multi-process. Must run before any other JAX call."""
    env = os.environ if environ is None else environ
    num = env.get("LMIDIST_NUM_PROCESSES") or env.get("JAX_NUM_PROCESSES")
    if not num or int(num) <= 1:
        return False
    address = env.get("LMIDIST_COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS")
    pid = env.get("LMIDIST_PROCESS_ID") or env.get("JAX_PROCESS_ID")
    if not address or pid is None:
        raise ValueError("multi-process run: set LMIDIST_COORDINATOR_ADDRESS (host:port) and "
                         f"LMIDIST_PROCESS_ID (0..{int(num) - 1}) besides LMIDIST_NUM_PROCESSES={num}")
    local = env.get("LMIDIST_LOCAL_DEVICE_IDS")
    if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator_plugin():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address, num_processes=int(num), process_id=int(pid),
        local_device_ids=[int(x) for x in local.split(",")] if local else None)
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _has_accelerator_plugin() -> bool:
    try:
        import jax_plugins  # noqa: F401  (CUDA plugins register under this namespace)

        return True
    except ImportError:
        return False


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_leader() -> bool:
    return jax.process_index() == 0


def _to_wire(tree):
    # The broadcast is a psum over processes: send bools as int32.
    return jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.int32) if np.asarray(x).dtype == np.bool_
                                  else np.asarray(x), tree)


def _from_wire(tree, like):
    return jax.tree_util.tree_map(lambda x, ref: np.asarray(x).astype(np.asarray(ref).dtype), tree, like)


def broadcast_batch(batch, num_tokens: int, num_seqs: int, decode_only: bool, num_steps: int = 1):
    """Leader: send the step's shapes, then the batch. Returns the batch as broadcast."""
    header = np.array([num_tokens, num_seqs, int(decode_only), 0, num_steps], np.int32)
    multihost_utils.broadcast_one_to_all(header)
    return _from_wire(multihost_utils.broadcast_one_to_all(_to_wire(batch)), batch)


def broadcast_stop() -> None:
    multihost_utils.broadcast_one_to_all(np.array([0, 0, 0, 1, 0], np.int32))


def follow(runner) -> int:
    """Follower loop: run every step the leader broadcasts until it says stop.
    Returns the number of steps run."""
    steps = 0
    while True:
        header = multihost_utils.broadcast_one_to_all(np.zeros(_HEADER_SIZE, np.int32))
        num_tokens, num_seqs, decode_only, stop, num_steps = (int(v) for v in header)
        if stop:
            return steps
        like = runner.dummy_batch(num_tokens, num_seqs, bool(decode_only))
        batch = _from_wire(multihost_utils.broadcast_one_to_all(_to_wire(like)), like)
        out, _ = runner._run(batch, num_steps)
        jax.block_until_ready(out.token_ids)
        steps += 1
