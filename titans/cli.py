"""The `titans` command: one entry point with a subcommand per task."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

# Subcommand name -> module under titans.commands with add_arguments(parser) and run(args).
COMMANDS = {
    "serve": "Run the HTTP inference server.",
    "generate": "Generate a continuation of a prompt, or run a JSONL file of prompts offline.",
    "chat": "Chat with a running server in the terminal.",
    "prepare": "Tokenise text files into training data (trains a tokenizer if none is given).",
    "train": "Train a model on prepared data.",
    "eval": "Evaluate a checkpoint on the validation split, with the memory ablation.",
    "export": "Turn a training checkpoint into a serving checkpoint directory.",
    "analyze-memory": "Record what the neural memory does while it reads a text.",
    "profile": "Report where time goes in prefill and decode.",
}

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = os.environ.get("TITANS_CHECKPOINT") or str(REPO_ROOT / "checkpoints" / "shakespeare-small")


class CommandError(Exception):
    """An error the CLI reports as one line and exit status 2."""


def _module_name(command: str) -> str:
    return "titans.commands." + command.replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titans",
        description="Titans MAC language models: train, evaluate, serve and generate with a "
                    "neural long-term memory per session.")
    parser.add_argument("--log-level", default=os.environ.get("TITANS_LOG_LEVEL", "INFO"),
                        help="logging level: DEBUG, INFO, WARNING or ERROR (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        try:
            module = importlib.import_module(_module_name(name))
        except ModuleNotFoundError as exc:
            if exc.name == _module_name(name):
                continue  # a command this installation does not ship
            raise
        command = sub.add_parser(name, help=summary, description=summary,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CommandError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the importable module's main, so `python -m titans.cli` raises and catches the
    # same CommandError class as the commands (which import titans.cli, not __main__).
    from titans.cli import main as module_main

    sys.exit(module_main())
