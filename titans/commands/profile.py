"""`titans profile`: where time goes in prefill and a decode step, by model stage, with FLOPs."""

from __future__ import annotations

import argparse


EPILOG = """\
The report has one table for the prefill (--batch prompts of --prompt-tokens random tokens
fed as one batch, then one sampled token per session) and one for a decode step (the mean
over --decode-steps steps of one token per session). Each table gives the time of each
stage: attention, memory read (with the output gate), memory update (write inputs and
chunk updates), MLP, output head and sampling (one sampler call per session), and "other"
for time outside these. The stage times come from torch.profiler record_function ranges.
The profiler adds a cost to every operator, so the report also gives wall times measured
without it. GFLOP is an analytic estimate of matrix-product FLOPs from the configuration,
and "profiler GFLOP" is what torch.profiler counts (it does not count the attention kernel).
The report ends with the time of State.to_bytes() per session and the session state size.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout and shows option defaults other than None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from titans.cli import DEFAULT_CHECKPOINT

    parser.formatter_class = _HelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="serving checkpoint directory")
    parser.add_argument("--batch", type=int, default=1, help="sessions prefilled and decoded together")
    parser.add_argument("--prompt-tokens", type=int, default=256,
                        help="random prompt tokens per session, prefilled in one feed")
    parser.add_argument("--decode-steps", type=int, default=32,
                        help="decode steps to average over (one token per session each)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto picks CUDA when present)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and of sampling")
    parser.add_argument("--trace", help="write a Chrome trace of the profiled pass to this JSON file")
    parser.add_argument("--json", help="also write the report as JSON to this file")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from titans.analysis.profile import format_report, profile_model
    from titans.cli import CommandError
    from titans.model.checkpoint import load_checkpoint

    for option, value in (("--batch", args.batch), ("--prompt-tokens", args.prompt_tokens),
                          ("--decode-steps", args.decode_steps)):
        if value < 1:
            raise CommandError(f"{option} must be at least 1, got {value}")
    for option, path in (("--trace", args.trace), ("--json", args.json)):
        if path and not Path(path).resolve().parent.is_dir():
            raise CommandError(f"{option}: directory of {path} not found; create it first")

    checkpoint = load_checkpoint(args.checkpoint, args.device)
    report = profile_model(checkpoint.model, batch=args.batch, prompt_tokens=args.prompt_tokens,
                           decode_steps=args.decode_steps, seed=args.seed, trace=args.trace,
                           checkpoint=str(checkpoint.path))
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"report written to {args.json}")
    return 0
