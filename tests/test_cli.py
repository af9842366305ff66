"""The command line: output, speeds, and one-line errors with a non-zero exit."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import FIXTURES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minibatch", *args], capture_output=True, text=True, timeout=120)


def test_generate_streams_and_reports_speed():
    result = run_cli("generate", "def f(x):", "--model", str(FIXTURES / "llama_gqa"), "--max-tokens", "5",
                     "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(x):")
    assert re.search(r"prefill \d+ tokens: [\d.]+ tok/s \| decode \d+ tokens", result.stderr)


def test_info_describes_the_model():
    result = run_cli("info", "--model", str(FIXTURES / "qwen2_bias"))
    assert result.returncode == 0, result.stderr
    assert "Qwen2ForCausalLM" in result.stdout and "parameters" in result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_missing_model_directory_is_one_line():
    assert_one_line_error(run_cli("generate", "x", "--model", "/nonexistent/dir"), "does not exist")


def test_malformed_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text((FIXTURES / "llama_gqa" / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert_one_line_error(run_cli("info", "--model", str(tmp_path)), "not valid JSON")


def test_prompt_longer_than_the_context_is_one_line():
    assert_one_line_error(run_cli("generate", "x" * 600, "--model", str(FIXTURES / "llama3_rope")), "context")
