"""Command line: ``minibatch generate``, ``minibatch info``, ``minibatch quantize``, ``minibatch download``.

Bad input (a missing model, a malformed checkpoint, a prompt longer than the context)
prints one line saying what is wrong and exits non-zero, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from minibatch.backend import BACKENDS
from minibatch.quant import SCHEMES

# copied next to the quantized weights by `minibatch quantize`
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minibatch", description="A teaching LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete a prompt, streaming the text")
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--model", default=None, help="Hugging Face checkpoint directory "
                          "(default: the embedded tiny model)")
    generate.add_argument("--backend", choices=BACKENDS, default="numpy")
    generate.add_argument("--max-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--no-stream", action="store_true", help="print the text once it is complete")

    info = commands.add_parser("info", help="describe a model: architecture, parameters, memory")
    info.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")

    quantize = commands.add_parser("quantize", help="write a copy of a checkpoint with quantized projections")
    quantize.add_argument("--scheme", required=True, help=f"one of {', '.join(SCHEMES)}")
    quantize.add_argument("in_dir", help="float checkpoint directory")
    quantize.add_argument("out_dir", help="new directory for the quantized checkpoint (must not exist or be empty)")

    download = commands.add_parser("download", help="fetch a checkpoint by Hugging Face repo id (needs the "
                                   "'hf' extra and network access)")
    download.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-135M")
    download.add_argument("directory", help="where to put it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": run_generate, "info": run_info, "quantize": run_quantize, "download": run_download}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as error:
        print(f"minibatch: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run_generate(args: argparse.Namespace) -> int:
    from minibatch import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    llm = LLM(args.model, backend=args.backend)
    llm.engine.check_request(args.prompt, params)  # a bad request fails before anything is printed
    print(args.prompt, end="", flush=True)
    output = None
    for delta, latest in llm.stream_outputs(args.prompt, params):
        output = latest
        if not args.no_stream and delta:
            print(delta, end="", flush=True)
    if args.no_stream:
        print(output.text, end="")
    print()
    print(speed_summary(output), file=sys.stderr)
    return 0


def speed_summary(output) -> str:
    """``prefill N tok in ... (x tok/s) | decode M tok ... (y tok/s)`` from a finished output."""
    m = output.metrics
    prefill = m.first_token_time - m.arrival_time
    decode_tokens = len(output.token_ids) - 1
    decode = m.finished_time - m.first_token_time
    decode_rate = f"{decode_tokens / decode:.1f} tok/s" if decode > 0 else "n/a"
    return (f"[prefill {len(output.prompt_token_ids)} tokens: {len(output.prompt_token_ids) / prefill:.1f} tok/s"
            f" | decode {decode_tokens} tokens: {decode_rate} | finish: {output.finish_reason}]")


def run_info(args: argparse.Namespace) -> int:
    from minibatch.checkpoint import load_weights
    from minibatch.config import ModelConfig
    from minibatch.kv_cache import kv_bytes_per_token
    from minibatch.llm import resolve_model_dir
    from minibatch.quant import projection_sizes, quantization_of

    model_dir = resolve_model_dir(args.model)
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config)
    scheme = quantization_of(weights)
    num_projection_weights, projection_bytes = projection_sizes(weights)
    quantization = "none (float32)" if scheme is None else \
        f"{scheme}: projections at {8 * projection_bytes / num_projection_weights:.4g} bits per weight, " \
        "embeddings, norms and lm_head float32"
    rows = [
        ("model", str(model_dir)),
        ("architecture", config.architecture),
        ("layers", config.num_layers),
        ("hidden / intermediate", f"{config.hidden_size} / {config.intermediate_size}"),
        ("heads / kv heads / head dim", f"{config.num_heads} / {config.num_kv_heads} / {config.head_dim}"),
        ("vocabulary", config.vocab_size),
        ("context (max_model_len)", config.max_model_len),
        ("rope", f"theta={config.rope_theta:g}, scaling={config.rope_scaling.rope_type}"),
        ("tied embeddings", config.tie_word_embeddings),
        ("parameters", f"{config.num_parameters:,}"),
        ("stored dtype", config.torch_dtype),
        ("quantization", quantization),
        ("weights in memory", _mib(weights.num_bytes)),
        ("KV cache per token (float32)", f"{kv_bytes_per_token(config):,} bytes"),
        ("KV cache, one full context", _mib(kv_bytes_per_token(config) * config.max_model_len)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize IN_DIR's projections into OUT_DIR, which appears whole or not at all."""
    from minibatch.checkpoint import load_weights, save_model
    from minibatch.config import ModelConfig
    from minibatch.llm import resolve_model_dir
    from minibatch.quant import check_scheme, projection_sizes, quantize_model

    check_scheme(args.scheme)
    in_dir, out_dir = Path(args.in_dir), Path(args.out_dir)
    resolve_model_dir(in_dir)  # a missing directory, or a file given for one, fails here
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} already exists and is not an empty directory: choose a new output directory")
    config = ModelConfig.from_dir(in_dir)
    weights = load_weights(in_dir, config)
    quantized = quantize_model(weights, args.scheme)  # every shape error surfaces before anything is written
    raw_config = json.loads((in_dir / "config.json").read_text())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        save_model(staging, raw_config, quantized)
        for name in TOKENIZER_FILES:
            if (in_dir / name).is_file():
                shutil.copy2(in_dir / name, staging / name)
        staging.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    count, before = projection_sizes(weights)
    _, after = projection_sizes(quantized)
    print(f"quantized {len(weights.layers) * 7} projections ({count:,} weights) to {args.scheme}: "
          f"{before:,} -> {after:,} bytes, {8 * before / count:g} -> {8 * after / count:.4g} bits per weight")
    print(f"all weights in memory: {_mib(weights.num_bytes)} -> {_mib(quantized.num_bytes)} "
          "(embeddings, norms and lm_head stay float32)")
    print(f"wrote {out_dir}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("downloading needs huggingface_hub: pip install 'minibatch[hf]'") from None
    path = snapshot_download(args.repo_id, local_dir=str(Path(args.directory)),
                             allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    print(path)
    return 0


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"
