"""Registered LoRA adapters: the registry (name -> directory), the host cache (LRU, up
to ``max_cpu_loras`` read adapters; evicted ones are re-read from their directory when a
request needs them, as lmi-dist did) and the device slots (1..max_loras; slot 0 = no
adapter) filled on demand before each step.

A slot is written by one compiled function (slot index traced), so adapter changes
never recompile the step or the write.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import re

import jax
import numpy as np

from ..models.loader import param_sharding, variables
from ..models.lora_linear import lora_b_name, lora_modules
from ..models.peft_adapter import AdapterError, LoraAdapter, read_adapter

logger = logging.getLogger("lmidist_jax")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass
class RegisteredAdapter:
    name: str
    path: str
    uid: int           # unique per registration: keys the prefix cache
    rank: int
    target_modules: tuple[str, ...]


@dataclasses.dataclass
class LoraStats:
    registered: int = 0
    removed: int = 0
    disk_reads: int = 0       # adapter directories read (registration and re-reads)
    host_evictions: int = 0
    slot_loads: int = 0       # adapters copied into a device slot
    slot_evictions: int = 0


class LoraManager:
    def __init__(self, model, *, max_loras: int, max_rank: int, max_cpu_loras: int | None = None):
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.modules = lora_modules(model)
        if not self.modules:
            raise ValueError("the model carries no LoRA slots (build it with models.lora_linear.with_lora)")
        self.registry: dict[str, RegisteredAdapter] = {}
        self.host: collections.OrderedDict[str, LoraAdapter] = collections.OrderedDict()
        self.slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order
        self.free_slots = list(range(max_loras, 0, -1))
        self.stats = LoraStats()
        self._uids = itertools.count(1)
        lora_vars = {path: var for path, var in variables(model.state).items() if var.get_metadata().get("lora")}
        self._paths = sorted(lora_vars, key=str)
        self._vars = [lora_vars[p] for p in self._paths]
        shardings = tuple(param_sharding(v, model.mesh) for v in self._vars)

        @functools.partial(jax.jit, donate_argnums=0, out_shardings=shardings)
        def write(arrays, slot, values):
            return tuple(a.at[slot].set(v.astype(a.dtype)) for a, v in zip(arrays, values))
        self._write = write

    # -- registry ------------------------------------------------------------------

    def add(self, name: str, path: str) -> RegisteredAdapter:
        """Reads and checks the adapter, then registers it. On any error (AdapterError)
        nothing changes."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise AdapterError(f"adapter name {name!r} is not valid: accepted 1-128 letters, digits, '.', '_', '-' "
                               f"(starting with a letter or digit)")
        if name in self.registry:
            raise AdapterError(f"adapter {name!r} is already registered (from {self.registry[name].path}); "
                               f"remove it first")
        adapter = self._read(name, str(path))
        entry = RegisteredAdapter(name, adapter.path, next(self._uids), adapter.rank, adapter.target_modules)
        self.registry[name] = entry
        self._cache(adapter)
        self.stats.registered += 1
        logger.info("LoRA adapter %r registered from %s (rank %d, %d modules)", name, adapter.path,
                    adapter.rank, len(adapter.target_modules))
        return entry

    def remove(self, name: str) -> None:
        if name not in self.registry:
            raise AdapterError(self.unknown_message(name))
        del self.registry[name]
        self.host.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.free_slots.append(slot)
        self.stats.removed += 1

    def unknown_message(self, name) -> str:
        known = ", ".join(sorted(self.registry)) or "none"
        return f"unknown adapter {name!r}; registered adapters: {known}"

    def get(self, name: str) -> RegisteredAdapter:
        entry = self.registry.get(name)
        if entry is None:
            raise AdapterError(self.unknown_message(name))
        return entry

    def describe(self, name: str) -> dict:
        entry = self.get(name)
        return {"name": name, "src": entry.path, "rank": entry.rank, "target_modules": list(entry.target_modules),
                "in_host_memory": name in self.host, "device_slot": self.slot_of.get(name)}

    def list(self) -> list[dict]:
        return [self.describe(name) for name in self.registry]

    # -- host cache ------------------------------------------------------------------

    def _read(self, name: str, path: str) -> LoraAdapter:
        adapter = read_adapter(name, path, spec=self.model.source_spec, modules=self.modules,
                               max_rank=self.max_rank)
        self.stats.disk_reads += 1
        return adapter

    def _cache(self, adapter: LoraAdapter) -> None:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        while len(self.host) > self.max_cpu_loras:
            evicted, _ = self.host.popitem(last=False)
            self.stats.host_evictions += 1
            logger.info("LoRA adapter %r evicted from host memory (max_cpu_loras=%d)", evicted, self.max_cpu_loras)

    def _host_adapter(self, name: str) -> LoraAdapter:
        adapter = self.host.get(name)
        if adapter is None:  # evicted: read again from its directory
            adapter = self._read(name, self.registry[name].path)
            self._cache(adapter)
        else:
            self.host.move_to_end(name)
        return adapter

    # -- device slots ------------------------------------------------------------------

    def activate(self, names) -> dict[str, int]:
        """Puts every adapter of ``names`` (a step's, at most max_loras) in a device slot,
        evicting the least recently used others. Returns name -> slot."""
        names = {n for n in names if n is not None}
        if len(names) > self.max_loras:
            raise RuntimeError(f"a step uses {len(names)} adapters; max_loras={self.max_loras}")
        for name in names:
            if name in self.slot_of:
                self.slot_of.move_to_end(name)
        for name in names:
            if name in self.slot_of:
                continue
            if not self.free_slots:
                victim = next(n for n in self.slot_of if n not in names)
                self.free_slots.append(self.slot_of.pop(victim))
                self.stats.slot_evictions += 1
            slot = self.free_slots.pop()
            self._write_slot(slot, self._host_adapter(name))
            self.slot_of[name] = slot
            self.stats.slot_loads += 1
        return {name: self.slot_of[name] for name in names}

    def slot(self, name: str | None) -> int:
        return 0 if name is None else self.slot_of[name]

    def _write_slot(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Writes ``adapter`` (None: zeros) into ``slot`` of every LoRA parameter."""
        values = []
        for path, var in zip(self._paths, self._vars):
            value = np.zeros(var.shape[1:], np.float32)
            delta = adapter.deltas.get(path[:-1]) if adapter is not None else None
            if delta is not None:
                if path[-1] == "lora_a":          # [in, P, R]
                    for index, a in delta.a.items():
                        value[:, index, :a.shape[1]] = a
                else:                              # [R, *dims]
                    part = next((p for p in delta.b if lora_b_name(p) == path[-1]), False)
                    if part is not False:
                        b = delta.b[part]
                        value[:b.shape[0]] = b
            values.append(value)
        new = self._write(tuple(v[...] for v in self._vars), np.int32(slot), tuple(values))
        for var, array in zip(self._vars, new):
            var.set_value(array)

    def warmup(self) -> None:
        """Compiles the slot write (rewriting slot 0 with its zeros)."""
        self._write_slot(0, None)


MODEL_ADAPTERS_DIR = "adapters"


def register_model_adapters(engine, model_dir) -> list[str]:
    """Registers every adapter directory under ``<model_dir>/adapters/`` by its directory
    name (as LMI did at start). A broken one stops the start-up with its error."""
    import os

    root = os.path.join(str(model_dir), MODEL_ADAPTERS_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    for name in names:
        try:
            engine.add_adapter(name, os.path.join(root, name))
        except AdapterError as e:
            raise AdapterError(f"{e} (found under {root}, registered at start)") from None
    return names
