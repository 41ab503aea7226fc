"""The `nanovllm` command (also `python -m nanovllm`): `nanovllm serve MODEL_DIR [options]` starts the
OpenAI-compatible server. Every LLM keyword is a flag, dashes for underscores as in vLLM (`--tensor-parallel-size 2`,
`--enforce-eager`, `--kvcache-block-size 16`); flags left out keep Config's defaults."""
import argparse
import sys
from dataclasses import MISSING, fields

from nanovllm.config import Config

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; only flags given on the command line reach the engine."""
    group = parser.add_argument_group("engine (the keywords of LLM; defaults from nanovllm.config.Config)")
    for f in fields(Config):
        if not f.init or f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = "" if f.default is MISSING else f" (default: {f.default})"
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{f.name}{default}")
        else:
            kind = f.type if f.type in (int, float) else str
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                               help=f"{f.name}{default}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="nano-vllm command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                                description="Serve MODEL_DIR over an OpenAI-compatible HTTP API (/v1/completions, "
                                "/v1/chat/completions, /v1/models, /health, /version, /metrics).")
    serve.add_argument("model", metavar="MODEL_DIR", help="Hugging Face checkpoint directory")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s; 0 = any free port)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send and /v1/models lists (default: MODEL_DIR as given)")
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    serve.add_argument("--uvicorn-log-level", default="info", choices=LOG_LEVELS, help="(default: %(default)s)")
    serve.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                       help="run the engine loop in a process of its own, away from the HTTP server's GIL "
                       "(default: %(default)s; --no-engine-process keeps it in a thread of the server)")
    add_engine_args(serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if command == "serve":
        try:
            from nanovllm.entrypoints.openai.server import run_server
        except ImportError as e:
            sys.exit(f"error: `nanovllm serve` needs the serve extra ({e}); run: pip install 'nano-vllm[serve]'")
        log_level = args.pop("uvicorn_log_level")
        run_server(args.pop("model"), host=args.pop("host"), port=args.pop("port"),
                   served_model_name=args.pop("served_model_name"), api_key=args.pop("api_key"),
                   log_level=log_level, engine_process=args.pop("engine_process"), **args)


if __name__ == "__main__":
    main()
