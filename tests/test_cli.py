"""The command line: output, speeds, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize(("args", "fragment"), [
    (("x" * 600,), "shorten it"),
    (("x", "--seed", "-1"), "SamplingParams.seed=-1"),
    (("x", "--temperature", "inf"), "SamplingParams.temperature=inf"),
])
def test_a_rejected_request_prints_only_the_error(args, fragment):
    """Nothing reaches stdout (not even the prompt's echo) before the one-line error."""
    result = run_cli("generate", *args, "--model", str(FIXTURES / "llama3_rope"))
    assert_one_line_error(result, fragment)
    assert result.stdout == ""


def test_model_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_one_line_error(run_cli("generate", "x", "--model", str(tmp_path / "model.safetensors")),
                          "is a file, not a directory")


def copy_with(tmp_path, config=None, safetensors_header=None):
    """A copy of llama_gqa with config.json or the safetensors header replaced."""
    raw = json.loads((FIXTURES / "llama_gqa" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw if config is None else config(raw)))
    if safetensors_header is None:
        (tmp_path / "model.safetensors").write_bytes((FIXTURES / "llama_gqa" / "model.safetensors").read_bytes())
    else:
        header = json.dumps(safetensors_header).encode()
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return tmp_path


@pytest.mark.parametrize(("edit", "fragment"), [
    ({"config": lambda raw: [raw]}, "expected a JSON object"),
    ({"config": lambda raw: {**raw, "vocab_size": None}}, "vocab_size=None"),
    ({"safetensors_header": [1, 2]}, "header is a JSON list"),
    ({"safetensors_header": {"x": {"dtype": "F32", "shape": [2]}}}, "malformed header entry"),
])
def test_malformed_model_files_are_one_line(tmp_path, edit, fragment):
    """Not a traceback (AttributeError, TypeError, KeyError) from deep inside the loader."""
    assert_one_line_error(run_cli("info", "--model", str(copy_with(tmp_path, **edit))), fragment)
