"""lmidist-jax: a JAX + Pallas re-creation of the lmi-dist rolling-batch LLM engine."""

import os as _os

# transformers is used for tokenizers and configs only; without torch it greets every
# run with "PyTorch was not found. Models won't be available ..." (an advisory warning).
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .outputs import CompletionOutput, RequestOutput, TokenLogprob
from .sampling_params import RequestError, SamplingParams


def __getattr__(name):
    # LLM pulls in JAX and the model code; import it lazily so `import lmidist_jax`
    # (e.g. for the config or CLI help) stays cheap.
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "TokenLogprob", "RequestError"]
__version__ = "0.1.0"
