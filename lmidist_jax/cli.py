"""Command line: ``lmidist-jax generate | chat | fetch-model | serve``."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _parse_option(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option expects NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), value.strip()  # "option.NAME" is accepted by the config like NAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmidist-jax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt and print it")
    gen.add_argument("--model", default=None, help="local HF directory, cached HF id, or 'smollm2' (default)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--option", action="append", type=_parse_option, default=[], metavar="NAME=VALUE",
                     help="engine option as in serving.properties (repeatable)")
    gen.add_argument("--save-converted", default=None, metavar="DIR",
                     help="also save the converted parameters (orbax) to DIR; DIR then loads as a model")

    fetch = sub.add_parser("fetch-model", help="download + convert a known model and print its directory")
    fetch.add_argument("name", nargs="?", default="smollm2", help="smollm2 (default) or gemma3-270m")

    serve = sub.add_parser("serve", help="serve the LMI HTTP API")
    serve.add_argument("--properties", default=None, help="serving.properties file")
    serve.add_argument("--model-dir", default=None, help="model directory (may hold serving.properties)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--option", action="append", type=_parse_option, default=[], metavar="NAME=VALUE")
    serve.add_argument("--save-converted", default=None, metavar="DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, RuntimeError, OSError) as e:  # user-fixable problems: one clear line
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Let the KV cache use the accelerator's memory (JAX preallocates 75% by default).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

    if args.command == "fetch-model":
        from .model_store import fetch_model

        print(fetch_model(args.name))
        return 0

    options = dict(args.option)
    if args.save_converted:
        options["save_converted"] = args.save_converted
    if args.command == "serve":
        from .server.app import serve

        serve(properties=args.properties, model_dir=args.model_dir, host=args.host, port=args.port,
              options=options)
        return 0

    from .llm import LLM
    from .sampling_params import SamplingParams

    # A one-off generation compiles the two shapes it uses instead of every bucket.
    llm = LLM(args.model, warmup=False, progress=args.verbose, **options)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    if out.error:
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    print(out.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
