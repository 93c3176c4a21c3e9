"""`titans generate`: continue one prompt, or run a JSONL file of prompts offline through the engine.

Batch mode (--input, --output) runs every line through the same Engine the server uses.
Lines with a session_id run in file order on that session's memory; different sessions
and lines without a session run concurrently in the decode batch. Each finished line is
appended to the output at once, so a rerun skips the lines whose id is already there.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)

BATCH_EPILOG = """\
batch mode: titans generate --input prompts.jsonl --output results.jsonl
  Each input line is a JSON object:
    prompt (required)   text to continue; may be empty only on a line with a session_id
    id                  string or integer, unique in the file; default "line-N" (N = line number)
    max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed
                        sampling parameters; the command-line options are the defaults
                        (max_tokens 0 appends the prompt to the session without generating)
    stop                a string or a list of strings that end the completion
    session_id          lines of one session run in file order and share its memory
    metadata            any JSON value, copied to the result
  Each output line is a JSON object with id, line, text, finish_reason, prompt_tokens,
  completion_tokens, and for session lines session_id and session_tokens (tokens the
  session's memory has absorbed after the line), plus metadata if the input had it.
  Output lines are appended in the order lines finish. A rerun skips lines whose id is
  already in the output. Invalid lines are reported on stderr with their line number and
  skipped, and so are the later lines of their session; the rest still run.
  Session memory is kept in --store. The default is a SQLite file next to the output
  (OUTPUT.sessions.db), so a rerun continues each session where the last run stopped.
  Ctrl-C lets the running lines finish and be written, then exits; a second Ctrl-C stops at once.
exit status: 0 when every line has a result, 1 when some lines were invalid, failed or
  were skipped, 2 for a command error (missing file, invalid option, unreadable checkpoint),
  130 after Ctrl-C.
"""

class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout and shows option defaults other than None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=200, help="maximum tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass; 1 = off")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="drop tokens below min-p times the top probability; 0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="divide logits of tokens already seen by this factor; 1 = off")
    parser.add_argument("--seed", type=int, default=None, help="random seed that makes sampling reproducible")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from titans.cli import DEFAULT_CHECKPOINT

    parser.formatter_class = _HelpFormatter
    parser.epilog = BATCH_EPILOG
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="serving checkpoint directory")
    parser.add_argument("--prompt", help="text to continue (single-prompt mode)")
    parser.add_argument("--input", help="JSONL file of prompts (batch mode; see below)")
    parser.add_argument("--output", help="JSONL file that batch mode appends results to")
    parser.add_argument("--store", help="session store URL for session lines in batch mode (memory://, "
                                        "sqlite:///path.db, redis://host:port/db); default: OUTPUT.sessions.db")
    parser.add_argument("--batch-size", type=int, default=32, help="batch mode: requests decoded together")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto picks CUDA when present)")
    add_sampling_arguments(parser)


def sampling_params(args: argparse.Namespace, stop_token_ids: tuple[int, ...] = ()):
    from titans.model.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop_token_ids=stop_token_ids)


def run(args: argparse.Namespace) -> int:
    from titans.cli import CommandError

    if args.input is not None or args.output is not None:
        if args.prompt is not None:
            raise CommandError("--prompt cannot be combined with --input/--output; use one mode")
        if args.input is None or args.output is None:
            raise CommandError("batch mode needs both --input and --output")
        from .generate_batch import run_batch

        return run_batch(args)
    return run_single(args)


def run_single(args: argparse.Namespace) -> int:
    import codecs

    from titans.cli import CommandError
    from titans.model.checkpoint import load_checkpoint
    from titans.model.generate import generate_tokens

    if args.prompt is None:
        raise CommandError("--prompt is required (or use --input and --output for batch mode)")
    if args.max_tokens < 1:
        raise CommandError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    checkpoint = load_checkpoint(args.checkpoint, args.device)
    tokenizer = checkpoint.tokenizer
    params = sampling_params(args, (tokenizer.eos_id,))
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise CommandError("--prompt must not be empty")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    for token in generate_tokens(checkpoint.model, prompt, args.max_tokens, params):
        sys.stdout.write(decoder.decode(tokenizer.token_bytes(token)))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return 0
