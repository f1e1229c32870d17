"""Evaluation with lm-evaluation-harness (the optional ``[eval]`` extra).

Importing this package registers the native lm-eval model ``lmidist-jax`` (alias
``lmidist``); ``python -m lmidist_jax.eval`` is lm-eval's own command line with it
registered. See ``lm_eval_model.py``.
"""

from .lm_eval_model import LmidistJaxLM

__all__ = ["LmidistJaxLM"]
