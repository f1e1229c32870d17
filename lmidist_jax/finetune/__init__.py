"""Fine-tuning LoRA adapters on the serving model, served by the same engine:

    run = train_lora(llm, examples, rank=8, alpha=16, targets=("q_proj", "v_proj"), steps=60)
    llm.add_adapter("mine", run.adapter_dir)      # LLM(..., enable_lora=True)

``train.py`` holds the loop (optax) and the training forward; ``data.py`` turns examples
into token ids with a loss mask.
"""

from .data import TrainingDataError, encode_examples
from .train import LoraTrainResult, causal_lm_logits, train_lora

__all__ = ["LoraTrainResult", "TrainingDataError", "causal_lm_logits", "encode_examples", "train_lora"]
