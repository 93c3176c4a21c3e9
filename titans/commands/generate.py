"""`titans generate`: continue one prompt from a checkpoint."""

from __future__ import annotations

import argparse
import sys


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

    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="serving checkpoint directory")
    parser.add_argument("--prompt", help="text to continue")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto picks CUDA when present)")
    add_sampling_arguments(parser)


def sampling_params(args: argparse.Namespace, stop_token_ids: tuple[int, ...] = ()):
    from titans.model.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop_token_ids=stop_token_ids)


def run(args: argparse.Namespace) -> int:
    import codecs

    from titans.cli import CommandError
    from titans.model.checkpoint import load_checkpoint
    from titans.model.generate import generate_tokens

    if args.prompt is None:
        raise CommandError("--prompt is required")
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
