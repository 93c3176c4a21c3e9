"""`titans train`: train a model on data made by `titans prepare`."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from dataclasses import fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from titans.training.settings import TrainSettings

    parser.add_argument("--config", required=True, help="model config: a name (tiny, small, ...) or a YAML file")
    parser.add_argument("--data", required=True, help="data directory made by `titans prepare`")
    parser.add_argument("--out", required=True, help="run directory for checkpoints, metrics and plots")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a model config field, e.g. --set vocab_size=4096 (repeatable)")
    helps = {
        "steps": "optimizer steps", "batch_size": "sequences per micro-batch per process",
        "seq_len": "tokens per training sequence; 0 = four segments",
        "accumulation": "micro-batches per optimizer step", "lr": "peak learning rate",
        "min_lr": "learning rate at the end of the cosine decay", "warmup": "linear warmup steps",
        "weight_decay": "AdamW decoupled weight decay on matrices", "grad_clip": "max gradient norm; 0 = off",
        "eval_interval": "steps between validation runs; 0 = only at the end",
        "eval_windows": "validation windows per evaluation", "checkpoint_interval": "steps between checkpoints",
        "seed": "random seed", "device": "auto, cpu or cuda", "threads": "CPU threads for torch; 0 = torch default",
        "init_from": "fine-tune: start from the weights of a serving checkpoint or a run directory",
    }
    defaults = TrainSettings()
    for f in fields(TrainSettings):
        if f.name in helps:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                                default=getattr(defaults, f.name), help=helps[f.name])


def run(args: argparse.Namespace) -> int:
    import yaml

    from titans.cli import CommandError
    from titans.model import MACConfig
    from titans.training.data import TokenData
    from titans.training.settings import TrainSettings
    from titans.training.trainer import train

    config = MACConfig.load(args.config)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise CommandError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in fields(MACConfig)})
        if unknown:
            raise CommandError(f"--set names unknown config fields {unknown}")
        config = config.replace(**overrides)

    data = TokenData.open(args.data)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings) if hasattr(args, f.name)})
    for name in ("steps", "batch_size", "accumulation"):
        if getattr(settings, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    settings.extra = {
        "command": "titans " + shlex.join(args.argv),
        "data": data.summary,
        "data_dir": str(Path(args.data).resolve()),
    }
    summary = train(config, args.data, args.out, settings, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0
