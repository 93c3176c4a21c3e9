"""`titans eval`: validation bits per byte and the memory ablation, as JSON and a plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="serving checkpoint directory")
    parser.add_argument("--data", required=True, help="data directory made by `titans prepare`")
    parser.add_argument("--out", help="output directory for eval.json and eval.png (default: CHECKPOINT)")
    parser.add_argument("--seq-len", type=int, default=0,
                        help="tokens per evaluation window; 0 = eight segments")
    parser.add_argument("--windows", type=int, default=0, help="windows to evaluate; 0 = the whole split")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def run(args: argparse.Namespace) -> int:
    from titans.cli import CommandError
    from titans.model.checkpoint import load_checkpoint
    from titans.training.data import TokenData
    from titans.training.evaluate import evaluate, plot_eval

    checkpoint = load_checkpoint(args.checkpoint, args.device)
    data = TokenData.open(args.data)
    if data.tokenizer.vocab_size != checkpoint.config.vocab_size:
        raise CommandError(f"the data's tokenizer has {data.tokenizer.vocab_size} tokens but the checkpoint's "
                           f"vocab_size is {checkpoint.config.vocab_size}")
    seq_len = args.seq_len or 8 * checkpoint.config.segment_len
    windows = data.windows("val", seq_len, limit=args.windows or None)
    result = evaluate(checkpoint.model, data.tokenizer, windows, args.batch_size)
    result["windows"] = windows.shape[0]
    result["seq_len"] = seq_len
    out = Path(args.out or args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot_eval(result, out / "eval.png")
    carried, reset = result["memory_carried"], result["memory_reset"]
    print(f"validation: {carried['bits_per_byte']:.4f} bits/byte ({carried['nats_per_byte']:.4f} nats/byte, "
          f"{carried['loss_per_token']:.4f} nats/token) over {carried['tokens']} tokens")
    print(f"memory reset each segment: {reset['nats_per_byte']:.4f} nats/byte; "
          f"memory gain {result['memory_gain_nats_per_byte']:.4f} nats/byte")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    return 0
