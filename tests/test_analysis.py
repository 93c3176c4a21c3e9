"""`titans analyze-memory` and its recorder, on a tiny random checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from titans.analysis.memory import mark_text, record_memory
from titans.cli import main
from titans.model import MACConfig, MACModel
from titans.model.checkpoint import load_checkpoint, save_checkpoint
from titans.model.neural_memory import memory_apply
from titans.model.tokenizer import Tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TOKENS = 300  # not a multiple of the tiny chunk size (8), so the last chunk is partial


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = CORPUS.read_text(encoding="utf-8")[:50_000]
    tokenizer = Tokenizer.train([text], 300)
    torch.manual_seed(0)
    model = MACModel(MACConfig.from_name("tiny").replace(vocab_size=300))
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="module")
def checkpoint(checkpoint_dir: Path):
    return load_checkpoint(checkpoint_dir, "cpu")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "scene.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def analysis(checkpoint_dir: Path, scene: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("analysis")
    status = main(["analyze-memory", "--checkpoint", str(checkpoint_dir), "--text", str(scene), "--out", str(out),
                   "--max-tokens", str(TOKENS), "--device", "cpu", "--csv", "--top", "5"])
    return status, out


def _shape(nested) -> list[int]:
    shape = []
    while isinstance(nested, list):
        shape.append(len(nested))
        nested = nested[0] if nested else None
    return shape


def _all_finite(nested) -> bool:
    return bool(np.isfinite(np.asarray(nested, dtype=np.float64)).all())


def test_analysis_writes_files(analysis):
    status, out = analysis
    assert status == 0
    for name in ("memory.json", "tokens.csv", "chunks.csv", "surprise.png", "gates.png", "weight_norm.png",
                 "memory_loss.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name


def test_analysis_json_has_documented_shapes(analysis, checkpoint):
    _, out = analysis
    document = json.loads((out / "memory.json").read_text(encoding="utf-8"))
    config = checkpoint.config
    layers, heads = config.layers, config.heads  # every tiny layer has a memory
    chunks = TOKENS // config.chunk_size

    assert document["format"] == "titans-memory-analysis"
    assert document["memory_layers"] == list(range(layers))
    assert document["axes"]["per_token"] == ["memory_layer", "head", "token"]
    assert document["axes"]["per_chunk"] == ["memory_layer", "head", "chunk"]
    for name in ("ids", "text", "byte_offsets"):
        assert len(document["tokens"][name]) == TOKENS, name
    for name in ("surprise", "theta", "eta", "alpha"):
        assert _shape(document["per_token"][name]) == [layers, heads, TOKENS], name
        assert _all_finite(document["per_token"][name]), name
    assert document["per_chunk"]["end_token"] == [config.chunk_size * (c + 1) for c in range(chunks)]
    for name in ("loss_before", "loss_after", "weight_norm", "momentum_norm"):
        assert _shape(document["per_chunk"][name]) == [layers, heads, chunks], name
        assert _all_finite(document["per_chunk"][name]), name
    assert _shape(document["initial"]["weight_norm"]) == [layers, heads]


def test_analysis_values_in_range(analysis, checkpoint):
    _, out = analysis
    document = json.loads((out / "memory.json").read_text(encoding="utf-8"))
    theta = np.asarray(document["per_token"]["theta"])
    eta = np.asarray(document["per_token"]["eta"])
    alpha = np.asarray(document["per_token"]["alpha"])
    assert ((theta > 0) & (theta <= checkpoint.config.memory_max_lr)).all()
    assert ((eta > 0) & (eta <= checkpoint.config.memory_max_momentum)).all()
    assert ((alpha > 0) & (alpha < 1)).all()
    assert (np.asarray(document["per_token"]["surprise"]) >= 0).all()


def test_analysis_marks_speakers(analysis):
    _, out = analysis
    document = json.loads((out / "memory.json").read_text(encoding="utf-8"))
    names = [turn["name"] for turn in document["markers"]["speaker_turns"]]
    assert names[:3] == ["First Citizen", "All", "First Citizen"]
    assert document["markers"]["speaker_turns"][0]["token"] == 0
    assert document["markers"]["line_breaks"]
    assert all(0 <= t < TOKENS for t in document["markers"]["line_breaks"])


def test_analysis_prints_summary(checkpoint_dir, scene, tmp_path, capsys):
    status = main(["analyze-memory", "--checkpoint", str(checkpoint_dir), "--text", str(scene),
                   "--out", str(tmp_path), "--max-tokens", "64", "--device", "cpu", "--top", "3"])
    out = capsys.readouterr().out
    assert status == 0
    assert "read 64 tokens" in out
    assert "most surprising tokens" in out
    assert "most surprising lines" in out
    assert "  1. token" in out
    assert "  3. token" in out
    assert "layer 0: surprise mean" in out


def test_surprise_matches_autograd(checkpoint):
    """Surprise, losses and norms agree with autograd and a direct evaluation on the second chunk."""
    model, chunk = checkpoint.model, checkpoint.config.chunk_size
    ids = checkpoint.tokenizer.encode(CORPUS.read_text(encoding="utf-8")[:200])[:2 * chunk + 3]
    record = record_memory(model, ids)

    state = model.new_state(1)
    with torch.inference_mode():
        model.feed(state, torch.tensor([ids[:chunk]]))
        start = [[w.clone() for w in layer.weights] for layer in state.layers]
        model.feed(state, torch.tensor([ids[chunk:2 * chunk]]))
    residual = checkpoint.config.memory_residual
    for row, layer in enumerate(state.layers):
        k, v = layer.chunk_k.clone(), layer.chunk_v.clone()
        for head in range(checkpoint.config.heads):
            for t in range(chunk):
                weights = [w[:, head:head + 1].clone().requires_grad_(True) for w in start[row]]
                output = memory_apply(weights, k[:, head:head + 1, t:t + 1], residual)
                loss = (output - v[:, head:head + 1, t:t + 1]).square().sum()
                grads = torch.autograd.grad(loss, weights)
                expected = math.sqrt(sum(float(g.square().sum()) for g in grads))
                assert record.surprise[row, head, chunk + t] == pytest.approx(expected, rel=1e-4, abs=1e-7)

        with torch.no_grad():
            before = (memory_apply(start[row], k, residual) - v).square().sum(-1).mean(-1)[0]
            after = (memory_apply(layer.weights, k, residual) - v).square().sum(-1).mean(-1)[0]
            norm = torch.sqrt(sum(w.square().sum(dim=(-1, -2)) for w in layer.weights))[0]
        np.testing.assert_allclose(record.loss_before[row, :, 1], before.numpy(), rtol=1e-5)
        np.testing.assert_allclose(record.loss_after[row, :, 1], after.numpy(), rtol=1e-5)
        np.testing.assert_allclose(record.weight_norm[row, :, 1], norm.numpy(), rtol=1e-5)
    assert record.surprise.shape[-1] == len(ids)
    assert record.loss_before.shape[-1] == 2


def test_mark_text_finds_speakers_and_lines(checkpoint):
    text = "ROMEO:\nBut soft: what light?\n\nJULIET:\nAy me!\nThis line ends in a colon but is far too long to be a name:\n"
    ids = checkpoint.tokenizer.encode(text)
    marked = mark_text(checkpoint.tokenizer, ids)
    assert "".join(marked.text) == text
    assert [name for _, name in marked.speaker_turns] == ["ROMEO", "JULIET"]
    assert len(marked.line_breaks) >= 5
    juliet_token = marked.speaker_turns[1][0]
    assert text.encode()[marked.byte_offsets[juliet_token]:].lstrip(b"\n").startswith(b"J")


def test_analysis_rejects_text_shorter_than_a_chunk(checkpoint_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Hi", encoding="utf-8")
    status = main(["analyze-memory", "--checkpoint", str(checkpoint_dir), "--text", str(short),
                   "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert status == 2
    assert "needs at least one memory chunk" in capsys.readouterr().err


def test_analysis_reports_missing_text(checkpoint_dir, tmp_path, capsys):
    status = main(["analyze-memory", "--checkpoint", str(checkpoint_dir), "--text", str(tmp_path / "none.txt"),
                   "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert status == 2
    assert "text file not found" in capsys.readouterr().err
