"""``python -m lmidist_jax.eval run --model lmidist-jax --model_args pretrained=smollm2 --tasks ...``:
lm-eval's command line (same arguments) with the ``lmidist-jax`` model registered."""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401  (registers the model)

    cli_evaluate()


if __name__ == "__main__":
    main()
