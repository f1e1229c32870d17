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
    serve.add_argument("--drain-seconds", type=float, default=None, metavar="S",
                       help="on SIGTERM/SIGINT, let requests in flight finish for up to S seconds "
                            "(option drain_seconds; default 20)")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every route but /ping "
                            "(default: $LMIDIST_JAX_API_KEY; none: no check)")
    serve.add_argument("--threads", type=int, default=64,
                       help="HTTP worker threads; each open request holds one (default 64)")
    serve.add_argument("--connection-limit", type=int, default=512,
                       help="most open connections; more wait in the listen backlog (default 512)")
    serve.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                       help="drop a connection whose request (headers + body) has not arrived S seconds "
                            "after its first byte (default 30)")
    serve.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                       help="close keep-alive connections idle for S seconds (default 60)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        _exit_now(_serve_main(args))
    try:
        return _run(args)
    except (ValueError, RuntimeError, OSError) as e:  # user-fixable problems: one clear line
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _serve_main(args) -> int:
    try:
        return _run(args)
    except (ValueError, RuntimeError, OSError) as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BaseException:  # noqa: BLE001 - printed, then the process ends below
        import traceback

        traceback.print_exc()
        return 1


def _exit_now(code: int) -> None:
    """Ends a server process without interpreter teardown. The warm-up's compilations or
    an engine step may still run in XLA on other threads; tearing the runtime down under
    them aborts the process ("terminate called after throwing ...", status 134), so the
    server stops its threads in order (serve()), flushes, and leaves with ``os._exit``."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not change the status
            pass
    os._exit(code)


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
        from .server import serve
        from .server.http import HttpSettings

        if args.drain_seconds is not None:
            options["drain_seconds"] = args.drain_seconds
        http = HttpSettings(threads=args.threads, connection_limit=args.connection_limit,
                            request_timeout=args.request_timeout, idle_timeout=args.idle_timeout)
        return serve(properties=args.properties, model_dir=args.model_dir, host=args.host, port=args.port,
                     options=options, api_key=args.api_key, http=http)

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
