"""Training settings, importable without torch (the CLI builds its options from them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainSettings:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch per process
    seq_len: int = 0  # tokens per sequence; 0 = four segments
    accumulation: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 2e-4  # learning rate at the end of the cosine decay
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.1  # decoupled, on matrices only
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    eval_interval: int = 100  # steps between evaluations; 0 = only at the end
    eval_windows: int = 64  # validation windows per evaluation
    checkpoint_interval: int = 200  # steps between checkpoints
    seed: int = 1337
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    init_from: str = ""  # start from these weights (a serving checkpoint or a run directory); "" = random
    extra: dict = field(default_factory=dict)  # recorded in the checkpoint (command line, data hash)
