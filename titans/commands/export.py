"""`titans export`: write a serving checkpoint from a training run."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="training run directory or its train_state.pt")
    parser.add_argument("--out", required=True, help="serving checkpoint directory to write")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the exported weights")
    parser.add_argument("--eval", dest="eval_json", help="eval.json from `titans eval` to put on the model card")
    parser.add_argument("--name", help="model name on the card (default: the output directory name)")


def run(args: argparse.Namespace) -> int:
    from titans.training.export import export

    out = export(args.checkpoint, args.out, args.dtype, args.eval_json, args.name)
    print(f"wrote {out}")
    return 0
