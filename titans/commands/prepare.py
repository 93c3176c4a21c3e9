"""`titans prepare`: text files -> tokenizer and train/validation token files."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                        help="UTF-8 text files, or directories whose files are all read")
    parser.add_argument("--tokenizer", help="existing tokenizer.json; without it one is trained on the training split")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size of a newly trained tokenizer")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of the corpus bytes, taken from the end, held out for validation")
    parser.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from titans.training.data import prepare

    summary = prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
    print(json.dumps({k: v for k, v in summary.items() if k != "sources"}, indent=2))
    return 0
