"""LoRA fine-tuning on the serving modules: the engine's own model (the same ``models/``
classes, its base parameters shared, not copied) rebuilt with the LoRA linear kind,
run without a cache over padded batches (dense causal attention, ``md.dense_causal``),
with only the LoRA matrices (variables of type ``LoraA`` / ``LoraB``) trained by optax.
The result is written as a PEFT adapter directory that the same engine serves with
``LLM.add_adapter``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
from numbers import Real
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .. import parallel
from ..models.loader import LoadedModel, variables
from ..models.lora_linear import LoraA, LoraB, base_linear_kind, lora_b_name, lora_modules, with_lora
from ..models.peft_adapter import AdapterTarget, adapter_targets, write_adapter
from ..models.step_metadata import StepMetadata, padded_batch_metadata
from .data import Batch, batch_order, encode_examples, make_batch, num_targets

# The training model's adapter slot (slot 0 is "no adapter" in the LoRA kind).
TRAIN_SLOT = 1
# Padded batch lengths are rounded up to a multiple of this (one compiled shape per run).
SEQ_LEN_MULTIPLE = 8


@dataclasses.dataclass
class LoraTrainResult:
    """What ``train_lora`` returns: the adapter directory (serve it with
    ``llm.add_adapter(name, result.adapter_dir)``), the loss of every step, and the trained
    model for checks (``logits``)."""

    adapter_dir: Path
    losses: list[float]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # the checkpoint modules adapted
    model: LoadedModel = dataclasses.field(repr=False)  # LoRA kind, the adapter in slot TRAIN_SLOT
    num_step_traces: int = 1  # times the train step was traced (compiled): once per run
    _forward: Any = dataclasses.field(default=None, repr=False, compare=False)

    def logits(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """The training forward with the adapter: float32 logits [len, vocab] of each
        sequence of token ids (every position, as a causal LM's forward returns them)."""
        lengths = [len(s) for s in sequences]
        if not sequences or min(lengths) < 1:
            raise ValueError("logits() needs a non-empty list of non-empty token id sequences")
        seq_len = _round_up(max(lengths), SEQ_LEN_MULTIPLE)
        token_ids = np.zeros((len(sequences), seq_len), np.int32)
        for row, s in enumerate(sequences):
            token_ids[row, :len(s)] = s
        md = padded_batch_metadata(lengths, seq_len, lora_slot=TRAIN_SLOT)
        if self._forward is None:
            self._forward = jax.jit(functools.partial(_forward_logits, graphdef=self.model.graphdef))
        logits = self._forward(self.model.state, token_ids.reshape(-1), md)
        logits = np.asarray(logits).reshape(len(sequences), seq_len, -1)
        return [logits[row, :n] for row, n in enumerate(lengths)]


def causal_lm_hidden(module, token_ids, md: StepMetadata):
    """token_ids [T] (a padded batch flattened, ``md`` from ``padded_batch_metadata``) ->
    the final hidden states [T, embed]: the serving model run with no cache."""
    hidden, _ = module(token_ids, [None] * len(module.layers), md)
    return hidden


def causal_lm_logits(module, token_ids, md: StepMetadata):
    """As ``causal_lm_hidden``, then the LM head: float32 logits [T, vocab]."""
    return module.logits(causal_lm_hidden(module, token_ids, md), md)


def _forward_logits(state, token_ids, md, *, graphdef):
    return causal_lm_logits(nnx.merge(graphdef, state), token_ids, md)


def _loss(trainable, frozen, token_ids, md, target_index, target_ids, target_weights, *, graphdef,
          scaling: float):
    """Mean next-token cross-entropy over the learned positions. ``trainable`` holds A and
    B as PEFT trains them; the model's B is B * alpha / r (the LoRA kind adds x A B)."""
    a_state, b_state = trainable
    b_scaled = jax.tree.map(lambda b: b * scaling, b_state)
    module = nnx.merge(graphdef, a_state, b_scaled, frozen)
    hidden = causal_lm_hidden(module, token_ids.reshape(-1), md)       # [B * L, embed]
    logits = module.logits(hidden[target_index], md)                   # [B * C, vocab]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, target_ids)
    return (losses * target_weights).sum() / jnp.maximum(target_weights.sum(), 1.0)


def train_step(trainable, opt_state, frozen, batch: Batch, md: StepMetadata, *, graphdef, optimizer, scaling):
    """One optimizer step on one padded batch; returns (trainable, opt_state, loss).
    ``train_lora`` jits it with the keyword arguments bound (a GraphDef is not hashable)
    and the step's state placed once, so that every step runs one compiled program."""
    loss, grads = jax.value_and_grad(_loss)(trainable, frozen, batch.token_ids, md, batch.target_index,
                                            batch.target_ids, batch.target_weights, graphdef=graphdef,
                                            scaling=scaling)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def make_optimizer(learning_rate: float, steps: int, warmup_steps: int, weight_decay: float,
                   max_grad_norm: float) -> optax.GradientTransformation:
    """AdamW under a linear warm-up + cosine decay schedule, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=learning_rate,
                                                  warmup_steps=warmup_steps, decay_steps=steps)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.adamw(schedule, weight_decay=weight_decay))


def train_lora(llm, data: Sequence[Any], *, rank: int = 8, alpha: float = 16,
               targets: Sequence[str] | str = ("q_proj", "v_proj"), steps: int = 100,
               learning_rate: float = 1e-3, batch_size: int = 8, seed: int = 0,
               output_dir: str | os.PathLike | None = None, warmup_steps: int | None = None,
               weight_decay: float = 0.0, max_grad_norm: float = 1.0, progress: bool = True,
               layers: Sequence[int] | None = None, model_dir: str | os.PathLike | None = None,
               base_model_name_or_path: str | None = None) -> LoraTrainResult:
    """Trains a LoRA adapter on ``llm``'s model (an ``LLM``, or an ``LLMEngine``) and writes
    it as a PEFT adapter directory.

    ``data``: examples (see ``finetune.data``): chat conversations (the assistant turns
    are learned, through the chat template), prompt/completion pairs (the completion and
    EOS are learned) or plain text. ``rank`` / ``alpha``: PEFT's ``r`` / ``lora_alpha``
    (the update is x A B * alpha / rank). ``targets``: checkpoint module names
    (``"q_proj"``, ``"down_proj"``...; PEFT's ``target_modules``). ``steps`` batches of
    ``batch_size`` examples (shuffled epochs) with AdamW, warm-up (``warmup_steps``,
    default a tenth of the steps) then cosine decay of ``learning_rate``, gradients clipped
    to ``max_grad_norm``; deterministic for a ``seed``. ``layers``: adapt only these layers
    (PEFT's ``layers_to_transform``; gradients then stop at the lowest one, so adapting the
    upper layers only trains faster). ``output_dir``: where the adapter is
    written (default: a new temporary directory). ``model_dir``: the base checkpoint
    directory (its tensor names name the adapter's modules), by default the one ``llm``
    was loaded from; ``base_model_name_or_path``: written to adapter_config.json (default:
    that directory).
    """
    engine = getattr(llm, "engine", llm)
    _check_numbers(rank=rank, alpha=alpha, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                   warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must name checkpoint modules, e.g. ('q_proj', 'v_proj'); got {targets!r}")
    base = engine.runner.model
    _check_model(base)
    model_dir = Path(model_dir) if model_dir is not None else _model_dir(llm)

    examples = encode_examples(data, engine)
    longest = max(len(e) for e in examples)
    if longest > engine.max_model_len:
        index = next(i for i, e in enumerate(examples) if len(e) == longest)
        raise ValueError(f"example {index} has {longest} tokens, more than max_model_len={engine.max_model_len}")
    seq_len = min(_round_up(longest, SEQ_LEN_MULTIPLE), engine.max_model_len)
    targets_per_row = _round_up(max(num_targets(e) for e in examples), 8)

    model = with_lora(base, TRAIN_SLOT + 1, rank, engine.max_model_len)
    found = adapter_targets(base.source_spec, checkpoint_shapes(model_dir), targets,
                            modules=lora_modules(model), rank=rank)
    if layers is not None:
        layers = _check_layers(layers, model.spec.num_layers)
        found = [t for t in found if t.path[:1] == ("layers",) and t.path[1] in layers]
    too_small = [t for t in found if rank > min(t.in_features, t.out_features)]
    if too_small:
        t = too_small[0]
        raise ValueError(f"rank={rank} is larger than {t.module} ({t.in_features} inputs, {t.out_features} "
                         f"outputs) allows: a LoRA's rank is at most min(inputs, outputs)")
    lora = getattr(engine, "lora", None)
    if lora is not None and rank > lora.max_rank:
        raise ValueError(f"rank={rank} is above this engine's max_lora_rank={lora.max_rank}: it could not serve the "
                         f"adapter; lower the rank or build the LLM with max_lora_rank >= {rank}")
    _init_adapter(model, found, seed)

    graphdef, a_state, b_state, frozen = nnx.split(model.module(), LoraA, LoraB, ...)
    scaling = float(alpha) / rank
    warmup = max(steps // 10, 0) if warmup_steps is None else warmup_steps
    optimizer = make_optimizer(learning_rate, steps, warmup, weight_decay, max_grad_norm)
    # One placement for the state the step updates, in and out: the arrays come from
    # several placements (logical axes on a mesh of one device), and jit compiles anew for
    # every combination it sees.
    replicated = parallel.replicated(model.mesh)
    trainable = jax.device_put((a_state, b_state), replicated)
    opt_state = jax.device_put(optimizer.init(trainable), replicated)
    order = batch_order(len(examples), batch_size, steps, seed)
    num_traces = 0

    def traced_step(*args):
        nonlocal num_traces
        num_traces += 1  # Python runs only while JAX traces: counts compilations
        return train_step(*args, graphdef=graphdef, optimizer=optimizer, scaling=scaling)

    step = jax.jit(traced_step, out_shardings=(replicated, replicated, replicated))

    from tqdm.auto import tqdm

    losses: list[float] = []
    bar = tqdm(order, desc="training LoRA", unit="step", disable=not progress)
    for indices in bar:
        batch = make_batch([examples[i] for i in indices], seq_len, targets_per_row)
        md = padded_batch_metadata(batch.lengths, seq_len, lora_slot=TRAIN_SLOT)
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch, md)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()

    a_state, b_state = trainable
    a, b = _adapter_matrices(a_state, b_state, found)
    directory = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="lora-adapter-"))
    write_adapter(directory, found, a, b, rank=rank, lora_alpha=alpha,
                  base_model_name_or_path=base_model_name_or_path or str(model_dir), target_modules=targets,
                  layers_to_transform=layers)
    # The served form: B scaled, as the LoRA kind (and the adapter reader) hold it.
    b_scaled = jax.tree.map(lambda x: x * scaling, b_state)
    served = nnx.merge(graphdef, a_state, b_scaled, frozen)
    graphdef, state = nnx.split(served)
    trained = LoadedModel(model.spec, graphdef, state, model.dtype, model.mesh, source_spec=model.source_spec)
    return LoraTrainResult(directory, losses, rank, float(alpha), tuple(t.module for t in found), trained,
                           num_traces)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_numbers(*, rank, alpha, steps, learning_rate, batch_size, warmup_steps, weight_decay, max_grad_norm):
    def integer(name, value, low):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} is not valid: accepted an integer >= {low}")

    def number(name, value, positive=True):
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value <= 0 if positive else value < 0):
            raise ValueError(f"{name}={value!r} is not valid: accepted a finite number {'> 0' if positive else '>= 0'}")

    integer("rank", rank, 1)
    integer("steps", steps, 1)
    integer("batch_size", batch_size, 1)
    number("alpha", alpha)
    number("learning_rate", learning_rate)
    number("max_grad_norm", max_grad_norm)
    number("weight_decay", weight_decay, positive=False)
    if warmup_steps is not None:
        integer("warmup_steps", warmup_steps, 0)
        if warmup_steps >= steps:
            raise ValueError(f"warmup_steps={warmup_steps} leaves no step after the warm-up (steps={steps})")


def _check_layers(layers, num_layers: int) -> list[int]:
    values = list(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else None
    if (not values or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in values)
            or not all(0 <= i < num_layers for i in values)):
        raise ValueError(f"layers={layers!r} is not valid: accepted a non-empty list of layer indices in "
                         f"0..{num_layers - 1}")
    return sorted({int(i) for i in values})


def _check_model(model: LoadedModel) -> None:
    spec = model.spec
    if spec.is_encoder_decoder:
        raise ValueError(f"train_lora supports decoder-only models; {spec.architecture} is an encoder-decoder")
    if base_linear_kind(spec.linear_kind) != "dense":
        raise ValueError(f"train_lora needs a model with dense (unquantized) weights; this one's linear kind is "
                         f"{base_linear_kind(spec.linear_kind)!r}")
    if model.mesh.size > 1:
        raise ValueError(f"train_lora runs on one device; this model is sharded over {model.mesh.size} "
                         f"(tensor_parallel_degree > 1)")


def _model_dir(llm) -> Path:
    from ..model_store import DEFAULT_MODEL, resolve_model

    config = getattr(llm, "config", None)
    if config is None:
        raise ValueError("pass model_dir=: this engine does not say which checkpoint directory it was loaded from")
    return Path(resolve_model(config.model_id or DEFAULT_MODEL, config.revision))


def checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the HF checkpoint in ``model_dir`` (safetensors headers
    only; a PyTorch .bin checkpoint is read whole)."""
    from converters.checkpoint import ModelLoadError, _safetensors_files, iter_checkpoint_tensors

    model_dir = Path(model_dir)
    files = _safetensors_files(model_dir) if model_dir.is_dir() else []
    if files:
        from safetensors import safe_open

        shapes = {}
        for f in files:
            with safe_open(str(f), framework="numpy") as h:
                shapes.update({name: tuple(h.get_slice(name).get_shape()) for name in h.keys()})
        return shapes
    try:
        return {name: tuple(array.shape) for name, array in iter_checkpoint_tensors(model_dir, progress=False)}
    except ModelLoadError as e:
        raise ValueError(f"the adapter's module names come from the base checkpoint's tensor names, and "
                         f"{model_dir} has none to read ({e}); pass model_dir= the HF checkpoint directory") from None


def _init_adapter(model: LoadedModel, found: list[AdapterTarget], seed: int) -> None:
    """PEFT's initialisation in the training slot: A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming
    uniform with a = sqrt(5)), B = 0; every other slot and untargeted part stays zero
    (their gradients are then exactly zero, so they stay so)."""
    params = variables(model.state)
    key = jax.random.key(seed)
    for i, t in enumerate(found):
        var = params[t.path + ("lora_a",)]
        rank = var.shape[-1]
        bound = 1.0 / math.sqrt(t.in_features)
        a = jax.random.uniform(jax.random.fold_in(key, i), (t.in_features, rank), jnp.float32, -bound, bound)
        var.set_value(var[...].at[TRAIN_SLOT, :, t.part_index, :].set(a.astype(var.dtype)))


def _adapter_matrices(a_state, b_state, found: list[AdapterTarget]):
    """module -> A [in, r] and B part [r, *dims] (unscaled) of the training slot."""
    a_vars, b_vars = variables(a_state), variables(b_state)
    a = {t.module: np.asarray(a_vars[t.path + ("lora_a",)][...][TRAIN_SLOT, :, t.part_index, :], np.float32)
         for t in found}
    b = {t.module: np.asarray(b_vars[t.path + (lora_b_name(t.part),)][...][TRAIN_SLOT], np.float32)
         for t in found}
    return a, b
