"""Training checkpoint -> serving checkpoint directory with a model card."""

from __future__ import annotations

import json
from pathlib import Path

from titans.model import MACConfig, MACModel
from titans.model.checkpoint import save_checkpoint
from titans.model.tokenizer import Tokenizer

from .trainer import TRAIN_STATE, ResumeError, load_train_state


def export(train_checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
           eval_json: str | Path | None = None, name: str | None = None) -> Path:
    path = Path(train_checkpoint)
    if path.is_dir():
        path = path / TRAIN_STATE
    payload = load_train_state(path)
    config = MACConfig.from_dict(json.loads(payload["config"]))
    settings = json.loads(payload["settings"])
    data = settings.get("extra", {}).get("data") or {}
    tokenizer_path = Path(settings.get("extra", {}).get("data_dir", "")) / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ResumeError(f"tokenizer of the training data not found at {tokenizer_path}")
    model = MACModel(config)
    model.load_state_dict(payload["model"])
    tokenizer = Tokenizer.from_file(tokenizer_path)
    out = save_checkpoint(model, tokenizer, out_dir, dtype)

    evaluation = json.loads(Path(eval_json).read_text(encoding="utf-8")) if eval_json else None
    stages = training_stages(settings, payload)
    card = model_card(name or out.name, config, stages, data, evaluation, dtype, model)
    (out / "README.md").write_text(card, encoding="utf-8")
    if evaluation:
        (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
    return out


def memory_gain_sentence(gain: float) -> str:
    if gain >= 0.01:
        return f"Carrying the memory across segments lowers the loss by {gain:.4f} nats per byte."
    if gain > 0:
        return (f"Carrying the memory across segments lowers the loss by only {gain:.4f} nats per byte: "
                "this model makes little use of what its memory keeps from earlier segments.")
    return (f"Carrying the memory across segments does not help this model: the loss is {-gain:.4f} "
            "nats per byte higher than with the memory reset at every segment start.")


def training_stages(settings: dict, payload: dict) -> list[tuple[dict, dict]]:
    """(settings, checkpoint) of every run behind a model, oldest first, following --init-from."""
    stages = [(settings, payload)]
    source = settings.get("init_from")
    while source:
        path = Path(source)
        path = path / TRAIN_STATE if path.is_dir() else path
        if not path.is_file():
            break  # initialised from a serving checkpoint: its own card records its history
        earlier = load_train_state(path)
        earlier_settings = json.loads(earlier["settings"])
        stages.insert(0, (earlier_settings, earlier))
        source = earlier_settings.get("init_from")
    return stages


def _stage_lines(settings: dict, payload: dict, config: MACConfig) -> list[str]:
    extra = settings.get("extra", {})
    commands = extra.get("commands") or [extra.get("command", "unknown")]
    if len(commands) == 1:
        lines = [f"- Command: `{commands[0]}`"]
    else:
        lines = ["- Commands (the run was resumed; each resume continues exactly where the last stopped, "
                 "under the new command's schedule):"]
        lines += [f"  {i}. `{command}`" for i, command in enumerate(commands, 1)]
    lines += [f"- Steps: {payload['step']:,}; tokens seen: {payload['tokens_seen']:,}; "
              f"wall time: {payload['elapsed'] / 60:.1f} min",
              f"- Optimizer: AdamW, peak lr {settings['lr']}, warmup {settings['warmup']} steps then cosine "
              f"to {settings['min_lr']}, weight decay {settings['weight_decay']}, clip {settings['grad_clip']}, "
              f"batch {settings['batch_size']} x {settings['seq_len'] or 4 * config.segment_len} tokens"]
    return lines


def model_card(name, config, stages, data, evaluation, dtype, model) -> str:
    lines = [f"# {name}", "",
             f"A Titans MAC language model ({config.name} config, {model.num_parameters():,} parameters, "
             f"weights in {dtype}).", ""]
    lines += ["## Training", ""]
    if len(stages) == 1:
        lines += _stage_lines(*stages[0], config)
    else:
        for index, (settings, payload) in enumerate(stages, 1):
            origin = "from random weights" if index == 1 else f"fine-tuned from stage {index - 1} (--init-from)"
            lines += ([""] if index > 1 else []) + [f"Stage {index}, {origin}:", ""]
            lines += _stage_lines(settings, payload, config)
        lines += ["", f"- In all: {sum(p['step'] for _, p in stages):,} steps, "
                      f"{sum(p['tokens_seen'] for _, p in stages):,} tokens, "
                      f"{sum(p['elapsed'] for _, p in stages) / 60:.1f} min of training", ""]
    for source in data.get("sources", []):
        lines.append(f"- Data: `{Path(source['path']).name}`, {source['bytes']:,} bytes, "
                     f"SHA-256 `{source['sha256']}`")
    if data:
        lines.append(f"- Split: last {data.get('val_fraction', 0.1):.0%} of the bytes held out for validation "
                     f"({data.get('train_tokens', 0):,} training tokens, {data.get('val_tokens', 0):,} "
                     f"validation tokens, vocabulary {data.get('vocab_size')})")
    lines.append("")
    if evaluation:
        carried, reset = evaluation["memory_carried"], evaluation["memory_reset"]
        lines += ["## Evaluation (validation split)", "",
                  f"{evaluation.get('windows')} windows of {evaluation.get('seq_len')} tokens "
                  f"({carried['bytes']:,} bytes), each from a fresh session.", "",
                  "| memory | nats/token | nats/byte | bits/byte |", "| --- | --- | --- | --- |",
                  f"| carried across segments | {carried['loss_per_token']:.4f} | {carried['nats_per_byte']:.4f} "
                  f"| {carried['bits_per_byte']:.4f} |",
                  f"| reset at every segment start | {reset['loss_per_token']:.4f} | {reset['nats_per_byte']:.4f} "
                  f"| {reset['bits_per_byte']:.4f} |", "",
                  memory_gain_sentence(evaluation["memory_gain_nats_per_byte"]), ""]
    lines += ["## Config", "", "```json", config.to_json(), "```", ""]
    return "\n".join(lines)
