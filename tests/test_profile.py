"""`titans profile` on a tiny random checkpoint: stages, FLOPs, state size and the Chrome trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from titans.analysis.profile import MODEL_STAGES, analytic_flops
from titans.cli import main
from titans.model import MACConfig, MACModel
from titans.model.checkpoint import save_checkpoint
from titans.model.tokenizer import Tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
STAGE_LABELS = ("attention", "memory read", "memory update", "MLP", "output head", "sampling")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = CORPUS.read_text(encoding="utf-8")[:50_000]
    tokenizer = Tokenizer.train([text], 300)
    torch.manual_seed(0)
    model = MACModel(MACConfig.from_name("tiny").replace(vocab_size=300))
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="module")
def profiled(checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("profile")
    argv = ["profile", "--checkpoint", str(checkpoint_dir), "--batch", "2", "--prompt-tokens", "20",
            "--decode-steps", "4", "--device", "cpu", "--trace", str(out / "trace.json"),
            "--json", str(out / "report.json")]
    return main(argv), out


def test_profile_report_names_stages(checkpoint_dir, capsys):
    status = main(["profile", "--checkpoint", str(checkpoint_dir), "--batch", "2", "--prompt-tokens", "20",
                   "--decode-steps", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0
    assert "prefill (2 x 20 tokens" in out
    assert "decode step (2 rows, mean of 4 steps" in out
    for label in STAGE_LABELS:
        # each stage has a row in the prefill table and one in the decode table
        assert sum(line.lstrip().startswith(label + " ") for line in out.splitlines()) == 2, label
    assert "state serialisation" in out
    assert "bytes serialised after prefill" in out
    assert "GFLOP/s" in out


def test_profile_json_report(profiled, checkpoint_dir):
    status, out = profiled
    assert status == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for phase in ("prefill", "decode"):
        stages = {row["name"]: row for row in report[phase]["stages"]}
        assert set(stages) == set(MODEL_STAGES) | {"sampling"}
        for name in MODEL_STAGES:
            assert stages[name]["ms"] > 0, (phase, name)
            assert stages[name]["calls"] >= 1, (phase, name)
            assert stages[name]["analytic_gflop"] > 0, (phase, name)
            assert stages[name]["gflops_per_second"] > 0, (phase, name)
        assert stages["sampling"]["ms"] > 0, phase
        assert stages["sampling"]["calls"] == 2, phase  # one sampler call per row
        assert report[phase]["ms"] >= sum(row["ms"] for row in stages.values()) * 0.999
        assert report[phase]["wall_ms"] > 0
    assert report["serialisation"]["ms"] > 0
    assert report["serialisation"]["units"] == 2
    assert report["state_bytes_after_prefill"] > 0
    assert report["state_bytes_after_decode"] > 0
    assert report["state_buffer_bytes"] > 0
    # 20 prompt tokens and 4 decode steps reach the chunk boundary at 24 once per session
    assert report["decode_chunk_updates"] == 2


def test_profile_writes_chrome_trace(profiled):
    _, out = profiled
    trace = json.loads((out / "trace.json").read_text(encoding="utf-8"))
    names = {event.get("name") for event in trace["traceEvents"]}
    for name in MODEL_STAGES + ("sampling", "prefill", "decode_step", "state_serialisation"):
        assert name in names, name


def test_analytic_flops_match_profiler_counts(profiled):
    """Stages that are pure matrix products agree with torch.profiler's count (which adds a few
    elementwise multiplies); attention is undercounted by the profiler, never overcounted."""
    _, out = profiled
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for phase in ("prefill", "decode"):
        stages = {row["name"]: row for row in report[phase]["stages"]}
        for name in ("mlp", "output_head", "memory_read"):
            analytic, counted = stages[name]["analytic_gflop"], stages[name]["profiler_gflop"]
            assert counted == pytest.approx(analytic, rel=0.05), (phase, name)
        assert stages["attention"]["profiler_gflop"] < stages["attention"]["analytic_gflop"]


def test_analytic_flops_scale_with_work():
    config = MACConfig.from_name("tiny")
    one = analytic_flops(config, tokens=1, logit_rows=1, chunk_updates=0)
    many = analytic_flops(config, tokens=10, logit_rows=1, chunk_updates=0)
    assert many["mlp"] == 10 * one["mlp"]
    assert many["output_head"] == one["output_head"]
    updated = analytic_flops(config, tokens=1, logit_rows=1, chunk_updates=1)
    assert updated["memory_update"] > one["memory_update"]
    assert one["output_head"] == 2 * config.dim * config.vocab_size


def test_profile_rejects_zero_batch(checkpoint_dir, capsys):
    status = main(["profile", "--checkpoint", str(checkpoint_dir), "--batch", "0", "--device", "cpu"])
    assert status == 2
    assert "--batch must be at least 1, got 0" in capsys.readouterr().err
