"""Training loop: AdamW, warmup + cosine schedule, clipping, accumulation, evaluation, checkpoints.

Runs on one process or under torchrun (DistributedDataParallel; gloo on the CPU, nccl on
CUDA). A training checkpoint (`train_state.pt`) contains the model, the optimizer, the step,
every random generator and the data sampler, so `--resume` continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from titans.model import MACConfig, MACModel
from titans.model.checkpoint import resolve_device

from .data import DataError, TokenData
from .evaluate import evaluate
from .settings import TrainSettings

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


class ResumeError(ValueError):
    """A training checkpoint that does not fit the current run."""


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, s.steps - s.warmup))
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def _setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    device = resolve_device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return rank, world, device


def _param_groups(model: MACModel, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def weights_checksum(model: MACModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train(config: MACConfig, data_dir: str | Path, out_dir: str | Path, settings: TrainSettings,
          resume: bool = False) -> dict:
    """Train `config` on a prepared data directory; returns the final summary."""
    rank, world, device = _setup_distributed(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = TokenData.open(data_dir)
    if data.tokenizer.vocab_size != config.vocab_size:
        raise DataError(
            f"the tokenizer in {data_dir} has {data.tokenizer.vocab_size} tokens but the config sets "
            f"vocab_size={config.vocab_size}; pass --set vocab_size={data.tokenizer.vocab_size} or re-run prepare")
    seq_len = settings.seq_len or 4 * config.segment_len

    torch.manual_seed(settings.seed)
    model = MACModel(config)
    if settings.init_from and not resume:
        _load_initial_weights(model, Path(settings.init_from))
    model = model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=(0.9, 0.95), fused=device.type == "cuda")
    # One sampler stream serves all ranks, and each rank takes its own slice of every draw.
    # So the sampler state is the same everywhere, and a resume restores every rank's data position.
    sampler = torch.Generator().manual_seed(settings.seed)
    step, tokens_seen, elapsed = 0, 0, 0.0
    if resume:
        step, tokens_seen, elapsed, earlier = _load_train_state(out / TRAIN_STATE, config, model, optimizer,
                                                                sampler)
        # Keep every command of the run on record, so the model card lists how it was made.
        commands = earlier.get("commands") or ([earlier["command"]] if earlier.get("command") else [])
        settings.extra["commands"] = commands + [settings.extra.get("command", "")]
        log.info("resumed from %s at step %d", out / TRAIN_STATE, step)

    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    metrics_file = (out / METRICS_FILE).open("a", encoding="utf-8") if rank == 0 else None
    tokens_per_step = settings.batch_size * seq_len * settings.accumulation * world
    bar = tqdm(total=settings.steps, initial=step, disable=rank != 0, dynamic_ncols=True,
               file=sys.stderr, mininterval=2.0)
    started = time.time() - elapsed
    last_eval: dict = {}
    # Sampler state after the last completed step. Ctrl-C inside a step rewinds to it, so
    # --resume draws that step's batches again instead of skipping them.
    # NOTE: an interrupt between optimizer.step() and `step += 1` still applies that update twice.
    completed_sampler_state = sampler.get_state()
    try:
        while step < settings.steps:
            t0 = time.time()
            lr = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(settings.accumulation):
                batch = data.batch("train", settings.batch_size * world, seq_len, sampler)
                batch = batch[rank * settings.batch_size:(rank + 1) * settings.batch_size].to(device)
                with autocast:
                    logits = ddp(batch[:, :-1])
                    loss = F.cross_entropy(logits.float().reshape(-1, config.vocab_size), batch[:, 1:].reshape(-1))
                (loss / settings.accumulation).backward()
                loss_sum += loss.item() / settings.accumulation
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip) \
                if settings.grad_clip > 0 else torch.tensor(0.0)
            if math.isfinite(loss_sum) and math.isfinite(float(norm)):
                optimizer.step()
            else:  # a diverged batch: drop its update instead of writing NaN into the weights
                log.warning("step %d: non-finite loss %.4g or gradient norm %.4g, update skipped",
                            step + 1, loss_sum, float(norm))
            optimizer.zero_grad(set_to_none=True)
            step += 1
            completed_sampler_state = sampler.get_state()
            tokens_seen += tokens_per_step
            rate = tokens_per_step / (time.time() - t0)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
            bar.update(1)
            record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": float(norm),
                      "tokens": tokens_seen, "tokens_per_s": rate, "time": time.time() - started}
            if step % settings.eval_interval == 0 if settings.eval_interval else step == settings.steps:
                last_eval = _evaluate(model, data, seq_len, settings.eval_windows)
                record["val"] = last_eval
                model.train()
                bar.write(f"step {step}: val loss {last_eval['loss_per_token']:.4f} nats/token, "
                          f"{last_eval['bits_per_byte']:.4f} bits/byte")
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if rank == 0 and (step % settings.checkpoint_interval == 0 or step == settings.steps):
                _save_train_state(out / TRAIN_STATE, config, settings, model, optimizer, sampler,
                                  step, tokens_seen, time.time() - started, last_eval)
    except KeyboardInterrupt:
        bar.close()
        sampler.set_state(completed_sampler_state)
        if rank == 0:
            _save_train_state(out / TRAIN_STATE, config, settings, model, optimizer, sampler,
                              step, tokens_seen, time.time() - started, last_eval)
            print(f"interrupted: saved a checkpoint at step {step} to {out / TRAIN_STATE}; "
                  f"continue with --resume", file=sys.stderr)
        return {"interrupted": True, "step": step}
    bar.close()

    summary = {"step": step, "tokens_seen": tokens_seen, "wall_time_s": time.time() - started,
               "val": last_eval, "world_size": world}
    _finish(out, model, summary, rank, world)
    return summary


def _load_initial_weights(model: MACModel, source: Path) -> None:
    """Load the weights of a serving checkpoint or a training run into `model` (fine-tuning)."""
    from titans.model.checkpoint import load_checkpoint

    if (source / "model.safetensors").is_file():
        weights = load_checkpoint(source, "cpu").model.state_dict()
    else:
        path = source / TRAIN_STATE if source.is_dir() else source
        weights = load_train_state(path)["model"]
    try:
        model.load_state_dict({k: v.float() for k, v in weights.items()})
    except RuntimeError as exc:
        raise ResumeError(f"--init-from {source} does not fit the config: {exc}") from None
    log.info("initialised the weights from %s", source)


def _finish(out: Path, model: MACModel, summary: dict, rank: int, world: int) -> None:
    checksum = weights_checksum(model)
    checksums = [checksum]
    if world > 1:
        checksums = [None] * world
        dist.all_gather_object(checksums, checksum)
        dist.destroy_process_group()
    if rank == 0:
        summary["rank_checksums"] = checksums
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        plot_metrics(out / METRICS_FILE, out / "loss_curve.png")


def _evaluate(model: MACModel, data: TokenData, seq_len: int, windows: int) -> dict:
    result = evaluate(model, data.tokenizer, data.windows("val", seq_len, limit=windows), ablation=False)
    return result["memory_carried"]


def _save_train_state(path: Path, config, settings, model, optimizer, sampler, step, tokens_seen,
                      elapsed, last_eval) -> None:
    payload = {
        "config": json.dumps(config.to_dict()),
        "settings": json.dumps(asdict(settings)),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.get_state(),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "tokens_seen": tokens_seen,
        "elapsed": elapsed,
        "last_eval": json.dumps(last_eval),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash mid-write keeps the previous checkpoint


def load_train_state(path: Path) -> dict:
    """Read a training checkpoint without unpickling arbitrary objects (weights_only)."""
    if not path.is_file():
        raise ResumeError(f"no training checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ResumeError(f"cannot read training checkpoint {path}: {exc}") from None


def _load_train_state(path: Path, config, model, optimizer, sampler) -> tuple[int, int, float, dict]:
    payload = load_train_state(path)
    saved = MACConfig.from_dict(json.loads(payload["config"]))
    if saved != config:
        diff = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items() if getattr(config, k) != v
                and k != "memory_layers"}
        raise ResumeError(f"checkpoint {path} was trained with a different config (saved, now): {diff}")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    sampler.set_state(payload["sampler"])
    torch.set_rng_state(payload["torch_rng"])
    extra = json.loads(payload["settings"]).get("extra", {})
    return int(payload["step"]), int(payload["tokens_seen"]), float(payload["elapsed"]), extra


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", linewidth=1)
    evals = [r for r in rows if "val" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val"]["loss_per_token"] for r in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
