"""End-to-end tests of prepare, train, eval, export and generate through the `titans` CLI.

They run the tiny config for a few steps on the first 60 KB of tinyshakespeare, copied into
a temporary directory. Set TITANS_TEST_CORPUS to use another copy of that file. Commands
run in-process through `titans.cli.main` where only the files matter, and as subprocesses
where the exit status, stderr, SIGINT or the recorded command line is what a test checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from titans.cli import main
from titans.model.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("TITANS_TEST_CORPUS",
                             REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
CORPUS_BYTES = 60_000
VOCAB_SIZE = 300
STEPS = 20
BATCH_SIZE = 4
SEQ_LEN = 64  # the tiny config's default: four segments of 16 tokens
# A warmup as long as the run keeps the learning rate of every step independent of
# --steps, so a run stopped early and resumed with --steps 20 follows the same schedule
# as an uninterrupted 20-step run.
TRAIN_OPTIONS = [
    "--config", "tiny", "--set", f"vocab_size={VOCAB_SIZE}", "--batch-size", str(BATCH_SIZE),
    "--warmup", str(STEPS), "--eval-interval", "10", "--eval-windows", "4",
    "--checkpoint-interval", "10", "--seed", "1337", "--device", "cpu", "--threads", "1",
]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 300


# The same call as the `titans` console script that pip installs. `python -m titans.cli`
# is not used here because it fails differently (see test_module_entry_point_one_line_error).
CLI = [sys.executable, "-c", "import sys; from titans.cli import main; sys.exit(main())"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run `titans ARGS` in a subprocess and return the finished process with its output."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=TIMEOUT_S)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


def count_logged_steps(run_dir: Path) -> int:
    """Count complete lines of metrics.jsonl, which a running training process appends to."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run_dir)}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


# --- shared runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def corpus(workspace) -> Path:
    if not CORPUS.is_file():
        pytest.skip(f"corpus not found at {CORPUS}; set TITANS_TEST_CORPUS to a copy of tinyshakespeare.txt")
    path = workspace / "corpus.txt"
    with CORPUS.open("rb") as source:
        path.write_bytes(source.read(CORPUS_BYTES))
    return path


@pytest.fixture(scope="module")
def data_dir(workspace, corpus) -> Path:
    out = workspace / "data"
    code = main(["prepare", "--input", str(corpus), "--out", str(out), "--vocab-size", str(VOCAB_SIZE)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def run_dir(workspace, data_dir) -> Path:
    """Run 20 steps in a subprocess, because an in-process run would record pytest's command line."""
    out = workspace / "run"
    result = run_cli("train", *TRAIN_OPTIONS, "--data", str(data_dir), "--out", str(out), "--steps", str(STEPS))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def export_dir(workspace, run_dir) -> Path:
    out = workspace / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def eval_dir(workspace, export_dir, data_dir) -> Path:
    out = workspace / "eval"
    code = main(["eval", "--checkpoint", str(export_dir), "--data", str(data_dir), "--windows", "8",
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    return out


# --- prepare --------------------------------------------------------------------------------


def test_prepare_writes_data_files(data_dir):
    for name in ("summary.json", "train.bin", "val.bin", "tokenizer.json"):
        assert (data_dir / name).is_file(), name


def test_prepare_summary_counts(data_dir, corpus):
    summary = read_json(data_dir / "summary.json")

    assert summary["bytes"] == CORPUS_BYTES
    assert summary["train_bytes"] + summary["val_bytes"] == CORPUS_BYTES
    assert summary["val_bytes"] == pytest.approx(CORPUS_BYTES * 0.1, abs=4)
    assert summary["vocab_size"] == VOCAB_SIZE
    assert summary["token_dtype"] == "uint16"
    assert summary["sources"][0]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert (data_dir / "train.bin").stat().st_size == 2 * summary["train_tokens"]
    assert (data_dir / "val.bin").stat().st_size == 2 * summary["val_tokens"]


def test_prepare_validation_is_corpus_tail(data_dir, corpus):
    from titans.training.data import TokenData

    data = TokenData.open(data_dir)
    text = corpus.read_bytes()

    assert data.tokenizer.decode_bytes(data.val.tolist()) == text[-data.summary["val_bytes"]:]
    assert data.tokenizer.decode_bytes(data.train.tolist()) == text[:data.summary["train_bytes"]]


def test_prepare_reuses_given_tokenizer(tmp_path, data_dir, corpus):
    out = tmp_path / "again"

    code = main(["prepare", "--input", str(corpus), "--out", str(out),
                 "--tokenizer", str(data_dir / "tokenizer.json")])

    assert code == 0
    assert (out / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    assert (out / "train.bin").read_bytes() == (data_dir / "train.bin").read_bytes()


# --- train ----------------------------------------------------------------------------------


def test_train_writes_run_files(run_dir):
    for name in ("metrics.jsonl", "train_state.pt", "train_summary.json"):
        assert (run_dir / name).is_file(), name
    assert_png(run_dir / "loss_curve.png")


def test_train_metrics_one_line_per_step(run_dir):
    records = read_metrics(run_dir)

    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(r["lr"] > 0 for r in records)
    assert records[-1]["tokens"] == STEPS * BATCH_SIZE * SEQ_LEN
    assert [r["step"] for r in records if "val" in r] == [10, 20]


def test_train_validation_metrics_finite(run_dir):
    evaluations = [r["val"] for r in read_metrics(run_dir) if "val" in r]

    for evaluation in evaluations:
        for key in ("loss_per_token", "perplexity", "nats_per_byte", "bits_per_byte"):
            assert math.isfinite(evaluation[key]), key
        assert evaluation["bits_per_byte"] == pytest.approx(evaluation["nats_per_byte"] / math.log(2))


def test_train_loss_decreases(run_dir):
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records]
    evaluations = [r["val"]["loss_per_token"] for r in records if "val" in r]

    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert evaluations[-1] < evaluations[0]


def test_train_summary(run_dir):
    summary = read_json(run_dir / "train_summary.json")

    assert summary["step"] == STEPS
    assert summary["tokens_seen"] == STEPS * BATCH_SIZE * SEQ_LEN
    assert summary["world_size"] == 1
    assert len(summary["rank_checksums"]) == 1


def test_resume_matches_uninterrupted_run(tmp_path, data_dir, run_dir):
    out = tmp_path / "resumed"
    options = [*TRAIN_OPTIONS, "--data", str(data_dir), "--out", str(out)]

    assert main(["train", *options, "--steps", "10"]) == 0
    assert main(["train", *options, "--steps", str(STEPS), "--resume"]) == 0

    expected = losses_by_step(run_dir)
    resumed = losses_by_step(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    summary = read_json(out / "train_summary.json")
    assert summary["rank_checksums"] == read_json(run_dir / "train_summary.json")["rank_checksums"]


def test_ctrl_c_saves_and_resumes(tmp_path, data_dir, run_dir):
    out = tmp_path / "interrupted"
    command = [*CLI, "train", *TRAIN_OPTIONS, "--data", str(data_dir),
               "--out", str(out), "--steps", "100000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=SUBPROCESS_ENV)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while count_logged_steps(out) < 3:
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "training logged fewer than 3 steps in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted: saved a checkpoint" in stderr
    stopped_at = json.loads(stdout)["step"]
    assert 3 <= stopped_at < STEPS
    assert (out / "train_state.pt").is_file()

    assert main(["train", *TRAIN_OPTIONS, "--data", str(data_dir), "--out", str(out),
                 "--steps", str(STEPS), "--resume"]) == 0

    expected = losses_by_step(run_dir)
    resumed = losses_by_step(out)
    for step in range(stopped_at + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    summary = read_json(out / "train_summary.json")
    assert summary["step"] == STEPS
    assert summary["rank_checksums"] == read_json(run_dir / "train_summary.json")["rank_checksums"]


def test_torchrun_two_processes_same_weights(tmp_path, data_dir):
    """Start 2 CPU processes with torchrun (gloo backend). Both ranks must end with equal weights."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "titans.cli", "train", "--config", "tiny", "--set", f"vocab_size={VOCAB_SIZE}",
               "--data", str(data_dir), "--out", str(out), "--steps", "4", "--batch-size", "2",
               "--eval-interval", "0", "--eval-windows", "2", "--device", "cpu", "--threads", "1"]

    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=tmp_path,
                            timeout=TIMEOUT_S)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_json(out / "train_summary.json")
    assert summary["world_size"] == 2
    assert summary["tokens_seen"] == 4 * 2 * SEQ_LEN * 2
    assert len(summary["rank_checksums"]) == 2
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]
    assert len(read_metrics(out)) == 4


# --- export, eval, generate -----------------------------------------------------------------


def test_export_writes_serving_files(export_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (export_dir / name).is_file(), name


def test_export_weights_match_training_state(export_dir, run_dir):
    payload = torch.load(run_dir / "train_state.pt", map_location="cpu", weights_only=True)
    exported = load_file(str(export_dir / "model.safetensors"))

    assert sorted(exported) == sorted(payload["model"])
    for name, tensor in payload["model"].items():
        assert torch.equal(exported[name], tensor), name


def test_export_loads_as_checkpoint(export_dir):
    checkpoint = load_checkpoint(export_dir, "cpu")

    assert checkpoint.config.vocab_size == VOCAB_SIZE
    assert checkpoint.fingerprint == hashlib.sha256((export_dir / "model.safetensors").read_bytes()).hexdigest()


def test_export_model_card(export_dir, run_dir, corpus):
    card = (export_dir / "README.md").read_text(encoding="utf-8")
    summary = read_json(run_dir / "train_summary.json")

    assert f"titans train --config tiny --set vocab_size={VOCAB_SIZE}" in card
    assert f"--steps {STEPS}" in card
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() in card
    assert f"Steps: {STEPS}" in card
    assert f"tokens seen: {summary['tokens_seen']:,}" in card
    assert f"vocabulary {VOCAB_SIZE}" in card


def test_export_bfloat16(tmp_path, run_dir):
    out = tmp_path / "bf16"

    assert main(["export", "--checkpoint", str(run_dir / "train_state.pt"), "--out", str(out),
                 "--dtype", "bfloat16"]) == 0

    weights = load_file(str(out / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert load_checkpoint(out, "cpu").config.vocab_size == VOCAB_SIZE
    assert "weights in bfloat16" in (out / "README.md").read_text(encoding="utf-8")


def test_eval_writes_json_and_plot(eval_dir):
    assert (eval_dir / "eval.json").is_file()
    assert_png(eval_dir / "eval.png")


def test_eval_results_finite(eval_dir):
    result = read_json(eval_dir / "eval.json")

    assert result["windows"] == 8
    assert result["seq_len"] == 8 * 16
    for key in ("memory_carried", "memory_reset"):
        assert key in result, key
        for field in ("loss_per_token", "perplexity", "nats_per_byte", "bits_per_byte"):
            assert math.isfinite(result[key][field]), f"{key}.{field}"
        assert result[key]["tokens"] == 8 * 8 * 16
        assert len(result[key]["loss_by_segment"]) == 8
    assert math.isfinite(result["memory_gain_nats_per_byte"])
    assert len(result["loss_by_position"]) == 8 * 16
    assert len(result["loss_by_position_reset"]) == 8 * 16


def test_eval_card_includes_ablation(tmp_path, run_dir, eval_dir):
    out = tmp_path / "with-eval"

    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out),
                 "--eval", str(eval_dir / "eval.json")]) == 0

    card = (out / "README.md").read_text(encoding="utf-8")
    assert "reset at every segment start" in card
    assert (out / "eval.json").is_file()


def test_generate_continues_prompt(export_dir):
    result = run_cli("generate", "--checkpoint", str(export_dir), "--prompt", "ROMEO:", "--max-tokens", "20",
                     "--seed", "3", "--device", "cpu")

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ROMEO:")
    assert len(result.stdout.rstrip("\n")) > len("ROMEO:")


def test_generate_seed_reproducible(export_dir, capsys):
    args = ["generate", "--checkpoint", str(export_dir), "--prompt", "ROMEO:", "--max-tokens", "20",
            "--seed", "5", "--device", "cpu"]

    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out

    assert first == second


# --- bad input: exit status 2 and one line on stderr ----------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(workspace, run_dir) -> Path:
    root = workspace / "bad"
    root.mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_bytes(b"  \n\t\n")
    (root / "empty_dir").mkdir()
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 10)
    (root / "incompatible").mkdir()
    shutil.copy(run_dir / "train_state.pt", root / "incompatible" / "train_state.pt")
    return root


@pytest.fixture(scope="module")
def byte_data_dir(workspace, corpus) -> Path:
    """Data with a 258-token tokenizer, so it does not fit the 300-token exported checkpoint."""
    out = workspace / "byte-data"
    assert main(["prepare", "--input", str(corpus), "--out", str(out), "--vocab-size", "258"]) == 0
    return out


BAD_INPUTS = {
    "missing_input": (["prepare", "--input", "{bad}/absent.txt", "--out", "{tmp}/out"], "input not found"),
    "empty_corpus": (["prepare", "--input", "{bad}/empty.txt", "--out", "{tmp}/out"], "empty"),
    "blank_corpus": (["prepare", "--input", "{bad}/blank.txt", "--out", "{tmp}/out"], "empty"),
    "empty_directory": (["prepare", "--input", "{bad}/empty_dir", "--out", "{tmp}/out"], "empty"),
    "non_utf8_input": (["prepare", "--input", "{bad}/latin1.txt", "--out", "{tmp}/out"], "not UTF-8"),
    "config_vocab_mismatch": (["train", "--config", "tiny", "--data", "{data}", "--out", "{tmp}/run",
                               "--steps", "2"], "--set vocab_size=300"),
    "unknown_config_field": (["train", "--config", "tiny", "--data", "{data}", "--out", "{tmp}/run",
                              "--set", "widht=3"], "widht"),
    "missing_data_dir": (["train", "--config", "tiny", "--data", "{tmp}/absent", "--out", "{tmp}/run"],
                         "titans prepare"),
    "resume_incompatible": (["train", "--config", "tiny", "--set", "vocab_size=300", "--set", "dim=32",
                             "--data", "{data}", "--out", "{bad}/incompatible", "--steps", "30", "--resume"],
                            "different config"),
    "resume_without_checkpoint": (["train", "--config", "tiny", "--set", "vocab_size=300", "--data", "{data}",
                                   "--out", "{tmp}/fresh", "--steps", "30", "--resume"],
                                  "no training checkpoint"),
    "export_missing_checkpoint": (["export", "--checkpoint", "{tmp}/absent", "--out", "{tmp}/export"],
                                  "no training checkpoint"),
    "eval_missing_checkpoint": (["eval", "--checkpoint", "{tmp}/absent", "--data", "{data}"],
                                "checkpoint directory not found"),
    "eval_data_vocab_mismatch": (["eval", "--checkpoint", "{export}", "--data", "{byte_data}",
                                  "--out", "{tmp}/eval"], "258 tokens"),
    "generate_missing_checkpoint": (["generate", "--checkpoint", "{tmp}/absent", "--prompt", "ROMEO:"],
                                    "checkpoint directory not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_error(case, tmp_path, bad_inputs, data_dir, byte_data_dir, export_dir):
    template, expected = BAD_INPUTS[case]
    places = {"bad": bad_inputs, "tmp": tmp_path, "data": data_dir, "byte_data": byte_data_dir,
              "export": export_dir}
    args = [part.format(**places) for part in template]

    result = run_cli(*args)

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ")
    assert expected in lines[0]


def test_module_entry_point_one_line_error(tmp_path, data_dir):
    result = subprocess.run([sys.executable, "-m", "titans.cli", "train", "--config", "tiny", "--data",
                             str(data_dir), "--out", str(tmp_path / "run"), "--set", "widht=3"],
                            capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=TIMEOUT_S)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --set names unknown config fields ['widht']"]
