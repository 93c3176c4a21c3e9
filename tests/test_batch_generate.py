"""`titans generate --input/--output`: offline batch inference through the engine.

Results are compared with the model's own single-session loop (`generate_tokens`) and with
a real `titans serve` process on a loopback port, on a tiny random checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from titans.cli import main
from titans.model import MACConfig, MACModel
from titans.model.checkpoint import load_checkpoint, save_checkpoint
from titans.model.generate import generate_tokens
from titans.model.sampling import SamplingParams
from titans.model.tokenizer import Tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
REPO_ROOT = Path(__file__).resolve().parents[1]


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


def reference(checkpoint, prompt_ids: list[int], max_tokens: int, **sampling) -> tuple[list[int], str]:
    """Token ids and text of the single-session loop, stopping at end-of-text as the engine does."""
    params = SamplingParams(stop_token_ids=(checkpoint.tokenizer.eos_id,), **sampling)
    ids = list(generate_tokens(checkpoint.model, prompt_ids, max_tokens, params))
    return ids, checkpoint.tokenizer.decode(ids)


def write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def read_results(path: Path) -> dict:
    results = {}
    for raw in path.read_text(encoding="utf-8").split("\n"):
        if raw.strip():
            record = json.loads(raw)
            results[record["id"]] = record
    return results


def run_batch(checkpoint_dir: Path, source: Path, output: Path, capsys, *extra: str) -> tuple[int, str]:
    status = main(["generate", "--checkpoint", str(checkpoint_dir), "--device", "cpu",
                   "--input", str(source), "--output", str(output), *extra])
    return status, capsys.readouterr().err


SAMPLED_LINES = [
    {"id": "greedy-1", "prompt": "ROMEO:\n", "max_tokens": 12, "temperature": 0},
    {"id": "greedy-2", "prompt": "First Citizen:\nBefore we proceed", "max_tokens": 9, "temperature": 0},
    {"id": "seeded-1", "prompt": "JULIET:\n", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 3},
    {"id": "seeded-2", "prompt": "All:\nSpeak", "max_tokens": 10, "temperature": 1.2, "top_k": 40,
     "min_p": 0.01, "repetition_penalty": 1.3, "seed": 11},
]


def test_batch_matches_generate_tokens(checkpoint_dir, checkpoint, tmp_path, capsys):
    source = write_jsonl(tmp_path / "prompts.jsonl", SAMPLED_LINES)
    status, err = run_batch(checkpoint_dir, source, tmp_path / "results.jsonl", capsys, "--batch-size", "4")
    assert status == 0, err
    results = read_results(tmp_path / "results.jsonl")
    assert set(results) == {line["id"] for line in SAMPLED_LINES}

    for number, line in enumerate(SAMPLED_LINES, start=1):
        sampling = {k: line[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
                    if k in line}
        prompt_ids = checkpoint.tokenizer.encode(line["prompt"])
        ids, text = reference(checkpoint, prompt_ids, line["max_tokens"], **sampling)
        result = results[line["id"]]
        assert result["text"] == text, line["id"]
        assert result["line"] == number
        assert result["prompt_tokens"] == len(prompt_ids)
        assert result["completion_tokens"] == len(ids)
        assert result["finish_reason"] in ("length", "stop")
        assert "session_id" not in result


def test_rerun_skips_done_lines(checkpoint_dir, tmp_path, capsys):
    lines = [{"id": "a", "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0},
             {"prompt": "JULIET:", "max_tokens": 4, "temperature": 0}]
    source = write_jsonl(tmp_path / "prompts.jsonl", lines)
    output = tmp_path / "results.jsonl"
    status, err = run_batch(checkpoint_dir, source, output, capsys)
    assert status == 0, err
    first = output.read_text(encoding="utf-8")
    assert set(read_results(output)) == {"a", "line-2"}

    status, err = run_batch(checkpoint_dir, source, output, capsys)
    assert status == 0, err
    assert output.read_text(encoding="utf-8") == first
    assert "0 lines ran, 2 were already in" in err

    write_jsonl(source, lines + [{"id": 7, "prompt": "All:", "max_tokens": 3, "temperature": 0}])
    status, err = run_batch(checkpoint_dir, source, output, capsys)
    assert status == 0, err
    assert output.read_text(encoding="utf-8").startswith(first)
    assert "1 lines ran, 2 were already in" in err
    assert sorted(map(str, read_results(output))) == ["7", "a", "line-2"]


def test_malformed_lines_reported_without_stopping(checkpoint_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "ok-1", "prompt": "ROMEO:", "max_tokens": 3, "temperature": 0},
        '{"id": "broken", "prompt": ',
        {"id": "no-prompt", "max_tokens": 3},
        {"id": "hot", "prompt": "x", "temperature": -1},
        {"id": "typo", "prompt": "x", "max_token": 3},
        {"id": "ok-1", "prompt": "duplicate id"},
        {"id": "big-seed", "prompt": "x", "seed": 2**64},
        {"id": "ok-2", "prompt": "JULIET:", "max_tokens": 3, "temperature": 0},
    ])
    output = tmp_path / "results.jsonl"
    status, err = run_batch(checkpoint_dir, source, output, capsys)

    assert status == 1
    assert set(read_results(output)) == {"ok-1", "ok-2"}
    assert "line 2: skipped: invalid JSON" in err
    assert "line 3: skipped: missing required field 'prompt'" in err
    assert "line 4: skipped: invalid sampling parameters: temperature must be >= 0" in err
    assert "line 5: skipped: unknown fields ['max_token']" in err
    assert "line 6: skipped: duplicate id 'ok-1' (first on line 1)" in err
    assert f"line 7: skipped: seed must be in 0..{2**63 - 1}" in err
    assert "2 lines ran, 0 were already in" in err
    assert "6 were invalid, failed or skipped" in err


def test_session_lines_share_memory(checkpoint_dir, checkpoint, tmp_path, capsys):
    source = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "s1-a", "session_id": "s1", "prompt": "First Citizen:\n", "max_tokens": 6, "temperature": 0},
        {"id": "solo", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0},
        {"id": "s2-a", "session_id": "s2", "prompt": "All:\n", "max_tokens": 5, "temperature": 0},
        {"id": "s1-b", "session_id": "s1", "prompt": "\nAll:\nSpeak", "max_tokens": 6, "temperature": 0},
    ])
    output = tmp_path / "results.jsonl"
    status, err = run_batch(checkpoint_dir, source, output, capsys)
    assert status == 0, err
    results = read_results(output)

    encode = checkpoint.tokenizer.encode
    ids_a, text_a = reference(checkpoint, encode("First Citizen:\n"), 6, temperature=0)
    history = encode("First Citizen:\n") + ids_a + encode("\nAll:\nSpeak")
    ids_b, text_b = reference(checkpoint, history, 6, temperature=0)
    assert results["s1-a"]["text"] == text_a
    assert results["s1-b"]["text"] == text_b
    assert results["s1-b"]["session_tokens"] == len(history) + len(ids_b)
    assert results["s1-b"]["session_id"] == "s1"


def test_session_resumes_on_rerun(checkpoint_dir, checkpoint, tmp_path, capsys):
    first = {"id": "a", "session_id": "talk", "prompt": "ROMEO:\n", "max_tokens": 5, "temperature": 0}
    second = {"id": "b", "session_id": "talk", "prompt": "\nJULIET:\n", "max_tokens": 5, "temperature": 0}
    source = write_jsonl(tmp_path / "prompts.jsonl", [first])
    output = tmp_path / "results.jsonl"
    status, err = run_batch(checkpoint_dir, source, output, capsys)
    assert status == 0, err
    assert (tmp_path / "results.jsonl.sessions.db").is_file()

    write_jsonl(source, [first, second])
    status, err = run_batch(checkpoint_dir, source, output, capsys)
    assert status == 0, err
    assert "1 lines ran, 1 were already in" in err

    encode = checkpoint.tokenizer.encode
    ids_a, _ = reference(checkpoint, encode("ROMEO:\n"), 5, temperature=0)
    _, text_b = reference(checkpoint, encode("ROMEO:\n") + ids_a + encode("\nJULIET:\n"), 5, temperature=0)
    assert read_results(output)["b"]["text"] == text_b


def test_session_stops_after_invalid_line(checkpoint_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "a", "session_id": "s", "prompt": "ROMEO:", "max_tokens": 3, "temperature": 0},
        {"id": "b", "session_id": "s", "prompt": "x", "top_k": -2},
        {"id": "c", "session_id": "s", "prompt": "JULIET:", "max_tokens": 3, "temperature": 0},
        {"id": "d", "prompt": "All:", "max_tokens": 3, "temperature": 0},
    ])
    output = tmp_path / "results.jsonl"
    status, err = run_batch(checkpoint_dir, source, output, capsys)
    assert status == 1
    assert set(read_results(output)) == {"a", "d"}
    assert "line 2: skipped: invalid sampling parameters: top_k must be >= 0" in err
    assert "line 3: skipped: line 2 of session 's' did not run" in err


def test_prompt_mode_still_works(checkpoint_dir, checkpoint, capsys):
    status = main(["generate", "--checkpoint", str(checkpoint_dir), "--device", "cpu", "--prompt", "ROMEO:",
                   "--max-tokens", "8", "--temperature", "0"])
    assert status == 0
    _, text = reference(checkpoint, checkpoint.tokenizer.encode("ROMEO:"), 8, temperature=0)
    assert capsys.readouterr().out == "ROMEO:" + text + "\n"


def test_input_without_output_rejected(checkpoint_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "x"}])
    status = main(["generate", "--checkpoint", str(checkpoint_dir), "--input", str(source)])
    assert status == 2
    assert "batch mode needs both --input and --output" in capsys.readouterr().err


# --- against a real server ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("titans.commands.serve", reason="titans serve is not installed")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TITANS_")}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "titans.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--checkpoint", str(checkpoint_dir)],
            stdout=log_file, stderr=subprocess.STDOUT, env=environment, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"titans serve exited with status {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"titans serve was not ready within 90 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_batch_equals_server_output(checkpoint_dir, server_url, tmp_path, capsys):
    session_lines = [
        {"id": "turn-1", "session_id": "play", "prompt": "First Citizen:\n", "max_tokens": 8,
         "temperature": 0.8, "top_p": 0.95, "seed": 5},
        {"id": "turn-2", "session_id": "play", "prompt": "\nAll:\n", "max_tokens": 8, "temperature": 0},
    ]
    source = write_jsonl(tmp_path / "prompts.jsonl", SAMPLED_LINES + session_lines)
    output = tmp_path / "results.jsonl"
    status, err = run_batch(checkpoint_dir, source, output, capsys, "--batch-size", "3")
    assert status == 0, err
    results = read_results(output)

    fields = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    with httpx.Client(base_url=server_url, timeout=60) as client:
        for line in SAMPLED_LINES:
            session = client.post("/v1/sessions").json()["id"]
            body = {k: line[k] for k in fields if k in line}
            response = client.post(f"/v1/sessions/{session}/generate", json=body)
            assert response.status_code == 200, response.text
            assert results[line["id"]]["text"] == response.json()["text"], line["id"]

        session = client.post("/v1/sessions").json()["id"]
        for line in session_lines:
            body = {k: line[k] for k in fields if k in line}
            response = client.post(f"/v1/sessions/{session}/generate", json=body)
            assert response.status_code == 200, response.text
            server_result = response.json()
            assert results[line["id"]]["text"] == server_result["text"], line["id"]
            assert results[line["id"]]["session_tokens"] == server_result["session_tokens"]
