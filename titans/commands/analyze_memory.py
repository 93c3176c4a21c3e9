"""`titans analyze-memory`: record surprise, gates, memory loss and weight norms while the model reads a text."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
outputs in --out:
  memory.json      the recorded values (T tokens, N = T // chunk_size completed chunks,
                   L_m memory layers, H heads; arrays are nested lists in this axis order):
                     memory_layers            [L_m] model layer index of each array row
                     tokens.ids, tokens.text, tokens.byte_offsets   [T]
                     markers.line_breaks      token indices that contain a newline
                     markers.speaker_turns    [{"token": i, "name": "ROMEO"}]
                     per_token.surprise       [L_m][H][T] norm of the memory-loss gradient
                                              at the chunk's start weights (all MLP matrices)
                     per_token.theta, .eta, .alpha   [L_m][H][T] learning rate, momentum
                                              decay and forgetting gates
                     per_chunk.end_token      [N] exclusive end token of each chunk
                     per_chunk.loss_before, .loss_after   [L_m][H][N] mean memory loss of
                                              the chunk's tokens before and after its update
                     per_chunk.weight_norm, .momentum_norm   [L_m][H][N] Frobenius norms
                                              after the update
                     initial.weight_norm      [L_m][H] norm of the initial memory weights
  surprise.png, gates.png, weight_norm.png, memory_loss.png   plots over the text
  tokens.csv, chunks.csv   the same values in long format (with --csv)

A trailing partial chunk has per-token values only: the memory updates once a chunk is complete.
Speaker turns are lines such as "ROMEO:": at most 40 characters, starting with a letter, and
ending with their only ':'. The printed summary ranks tokens and lines by relative surprise:
surprise over its median across the 257 tokens around it, averaged over layers and heads.
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
    parser.add_argument("--text", required=True, help="UTF-8 text file to read through the model")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="read at most this many tokens from the start of the text; 0 = the whole text")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto picks CUDA when present)")
    parser.add_argument("--csv", action="store_true", help="also write tokens.csv and chunks.csv")
    parser.add_argument("--top", type=int, default=10,
                        help="number of most surprising tokens and lines in the printed summary")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from titans.analysis.memory import analysis_dict, mark_text, record_memory, write_csv, write_json
    from titans.analysis.plots import write_plots
    from titans.analysis.summary import format_summary
    from titans.cli import CommandError
    from titans.model.checkpoint import load_checkpoint

    if args.max_tokens < 0:
        raise CommandError(f"--max-tokens must be 0 (the whole text) or positive, got {args.max_tokens}")
    if args.top < 0:
        raise CommandError(f"--top must be 0 or positive, got {args.top}")
    text_path = Path(args.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"text file not found: {text_path}")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"text file {text_path} is not valid UTF-8: {exc}") from None

    checkpoint = load_checkpoint(args.checkpoint, args.device)
    config = checkpoint.config
    token_ids = checkpoint.tokenizer.encode(text)
    if args.max_tokens:
        token_ids = token_ids[:args.max_tokens]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(token_ids), unit="tok", desc="reading", disable=None) as bar:
        record = record_memory(checkpoint.model, token_ids, progress=bar.update)
    marked = mark_text(checkpoint.tokenizer, token_ids)

    document = analysis_dict(
        record, marked, checkpoint=str(checkpoint.path), fingerprint=checkpoint.fingerprint,
        text_file=str(text_path),
        config={"chunk_size": config.chunk_size, "segment_len": config.segment_len, "heads": config.heads,
                "memory_depth": config.memory_depth})
    written = [out / "memory.json"]
    write_json(document, written[0])
    if args.csv:
        written += write_csv(record, marked, out)
    written += write_plots(record, marked, out)

    print(format_summary(record, marked, args.top))
    print()
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
