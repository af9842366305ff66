"""Batch-1 decode speed against the memory roofline, measured in one run.

Decoding one token at a time reads every weight once per step and does ~2 FLOPs per
weight, so its speed limit is memory bandwidth: ``roofline tokens/s = bandwidth /
weight bytes per step``. This script measures, in rounds, the bandwidth (a large float32
GEMV, the same operation decode is made of) and the decode speed of minibatch on

* the embedded tiny model, and
* a random checkpoint shaped like SmolLM2-135M (576 hidden, 30 layers, 9 heads,
  3 KV heads, 1536 MLP, 49152 vocab, tied embeddings), written locally,

and, when ``transformers`` and ``torch`` are installed, Hugging Face's decode of the same
checkpoint on the same kind of processor (the CPU beside the NumPy backend, the GPU beside
the GPU backend). Each model is also timed with its weights in the checkpoint's layout
(``ModelRunner(checkpoint_layout=True)``: 7 GEMVs per layer on separate row-major
matrices, where the runner's own layout has 4 on stacked ones, each in ``decode_order``), alternating
with the default runs so that both see the same machine. A GEMV runs right after every
decode step, and each step's speed is compared with the bandwidth of the GEMV beside it,
so that a change in the machine's load moves both sides of the ratio together (the GEMV
also evicts the caches, so a model small enough to stay in the last-level cache is
measured reading its weights from memory, as the roofline assumes); the table shows the
median round and every round's fraction. It prints the table and writes
``benchmarks/results/decode_<backend>.json``.

    python benchmarks/decode.py [--backend numpy|gpu] [--steps 32] [--repeats 9] [--out FILE]

BLAS threads change both sides of the ratio (a large GEMV scales with threads better than
a decode step's small ones do), so the results directory keeps one run with the default
threads (``decode_numpy.json``) and one with ``OPENBLAS_NUM_THREADS=1``
(``decode_numpy_1thread.json``).

Times are medians over steps and rounds; the machine is noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from minibatch.backend import get_backend
from minibatch.checkpoint import load_weights, save_model
from minibatch.config import ModelConfig
from minibatch.kv_cache import ContiguousKVCache
from minibatch.llm import DEFAULT_MODEL
from minibatch.model import ForwardBatch, ModelRunner, ModelWeights

RESULTS = Path(__file__).parent / "results"
SMOLLM2_135M_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
    "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 0,
}


class LinearProbe:
    """``x @ W.T`` for float32 ``x [tokens, cols]`` and ``W [rows, cols]``, kept ready on a
    backend: ``seconds()`` times one product, ``weight_bytes`` is what it reads."""

    def __init__(self, backend_name: str, tokens: int, rows: int, cols: int):
        self.ops = get_backend(backend_name)
        rng = np.random.default_rng(0)
        self.weight = self.ops.asarray(rng.standard_normal((rows, cols), dtype=np.float32))
        self.x = self.ops.asarray(rng.standard_normal((tokens, cols), dtype=np.float32))
        self.weight_bytes = rows * cols * 4

    def seconds(self) -> float:
        self.ops.synchronize()
        start = time.perf_counter()
        self.ops.linear(self.x, self.weight)
        self.ops.synchronize()
        return time.perf_counter() - start


def median_linear_seconds(backend_name: str, tokens: int, rows: int, cols: int, repeats: int) -> float:
    """Median seconds of ``x @ W.T`` (see :class:`LinearProbe`); the first two runs are
    warm-up and not counted."""
    probe = LinearProbe(backend_name, tokens, rows, cols)
    return statistics.median([probe.seconds() for _ in range(repeats)][2:])


def measure_gemv_bandwidth(backend_name: str, rows: int = 8192, cols: int = 8192, repeats: int = 15) -> float:
    """Bytes/s of ``x @ W.T`` for a 256 MiB float32 ``W``: decode's own memory roofline."""
    return rows * cols * 4 / median_linear_seconds(backend_name, 1, rows, cols, repeats)


def measure_gemm_flops(backend_name: str, size: int = 2048, repeats: int = 9) -> float:
    """FLOP/s of a large square float32 GEMM: the compute roofline a big enough batch meets."""
    return 2 * size ** 3 / median_linear_seconds(backend_name, size, size, size, repeats)


def weight_bytes_per_step(weights: ModelWeights, tied: bool) -> int:
    """Bytes a decode step reads: every weight once; an untied embedding only one row."""
    total = weights.num_bytes
    if not tied:
        total -= weights.embed_tokens.nbytes - weights.embed_tokens.shape[1] * 4
    return total


def write_smollm2_shaped(directory: Path) -> Path:
    """A random float16 checkpoint with SmolLM2-135M's shapes (~270 MB on disk)."""
    config = ModelConfig.from_hf(SMOLLM2_135M_SHAPE)
    rng = np.random.default_rng(0)
    from minibatch.model import LayerWeights

    def tensor(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)

    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    layers = [LayerWeights(np.ones(h, np.float16), tensor(q, h), tensor(kv, h), tensor(kv, h), tensor(h, q),
                           np.ones(h, np.float16), tensor(i, h), tensor(i, h), tensor(h, i))
              for _ in range(config.num_layers)]
    embed = tensor(config.vocab_size, h)
    save_model(directory, SMOLLM2_135M_SHAPE, ModelWeights(embed, layers, np.ones(h, np.float16), embed),
               dtype="float16")
    return directory


def time_minibatch_decode(model_dir: Path, backend_name: str, prompt_len: int, steps: int,
                          checkpoint_layout: bool = False,
                          probe: LinearProbe | None = None) -> tuple[list[float], list[float]]:
    """Seconds per decode step (batch 1, contiguous KV cache) after a ``prompt_len`` prefill,
    and, with a ``probe``, the seconds of one probe GEMV right after each step (a bandwidth
    sample taken within milliseconds of the step it is compared with)."""
    config = ModelConfig.from_dir(model_dir)
    runner = ModelRunner(config, load_weights(model_dir, config), get_backend(backend_name),
                         checkpoint_layout=checkpoint_layout)
    cache = ContiguousKVCache(max_seqs=1, max_len=prompt_len + steps + 1)
    runner.allocate_kv(cache.num_blocks, cache.block_size)
    cache.allocate(0)
    tokens = list(np.random.default_rng(1).integers(0, min(config.vocab_size, 256), prompt_len))
    times, probe_times = [], []
    position, new = 0, tokens
    for _ in range(steps + 1):
        slots = cache.slot_mapping(0, np.arange(position, position + len(new)))
        batch = ForwardBatch.build([(new, position, cache.block_table(0), slots)])
        start = time.perf_counter()
        logits = runner.run(batch)  # run() copies logits to the host: a full step
        times.append(time.perf_counter() - start)
        if probe is not None:
            probe_times.append(probe.seconds())
        position += len(new)
        new = [int(np.argmax(logits[-1]))]
    return times[1:], probe_times[1:]  # drop the prefill


PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # a fused layer's GEMVs, in step order


def projection_bandwidths(model_dir: Path, backend_name: str, rounds: int) -> dict[str, dict]:
    """Each of the runner's weight matrices timed alone: per projection (the fused layer's
    four, and the LM head), its shape and the median bandwidth of a batch-1 GEMV over all
    layers and ``rounds`` sweeps. A sweep runs the GEMVs in a decode step's order, so every
    matrix is read cold (the layers since its last use have streamed through the caches)
    with nothing else between them: what each GEMV costs apart from the rest of a step.
    """
    config = ModelConfig.from_dir(model_dir)
    runner = ModelRunner(config, load_weights(model_dir, config), get_backend(backend_name))
    ops, weights = runner.backend, runner.weights
    rng = np.random.default_rng(0)
    matrices = [(name, getattr(layer, name)) for layer in weights.layers for name in PROJECTIONS]
    matrices.append(("lm_head", weights.lm_head))
    inputs = {w.shape[1]: ops.asarray(rng.standard_normal((1, w.shape[1]), dtype=np.float32)) for _, w in matrices}
    seconds: dict[str, list[float]] = {name: [] for name, _ in matrices}
    for sweep in range(rounds + 1):  # the first sweep warms up and is not counted
        for name, weight in matrices:
            ops.synchronize()
            start = time.perf_counter()
            ops.linear(inputs[weight.shape[1]], weight)
            ops.synchronize()
            if sweep:
                seconds[name].append(time.perf_counter() - start)
    shapes = dict(matrices)  # name -> one matrix of that projection (all layers share its shape)
    return {name: {"shape": list(shapes[name].shape), "bytes": int(shapes[name].nbytes),
                   "bandwidth_bytes_per_s": shapes[name].nbytes / statistics.median(times)}
            for name, times in seconds.items()}


def time_hf_decode(model_dir: Path, prompt_len: int, steps: int, device: str = "cpu") -> list[float] | None:
    """Seconds per decode step of transformers' LlamaForCausalLM on ``device`` ("cpu" or
    "cuda"; None if transformers, torch or that device is absent)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        return None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, 256, (1, prompt_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            times.append(time.perf_counter() - start)
            past = out.past_key_values
    return times


def benchmark_model(name: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """Batch-1 decode of one model against the roofline, in ``args.repeats`` rounds.

    Each round times the runner's layout and the checkpoint's (alternating, so a busy
    spell on the machine hits both alike). A large GEMV runs right after every decode
    step, and each step is compared with the bandwidth of the GEMV beside it: on a
    machine whose load changes from second to second, the pair sees the same machine.
    A round's fraction of the roofline is the median over its steps; the result is the
    median round.
    """
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config)
    step_bytes = weight_bytes_per_step(weights, config.tie_word_embeddings)
    probe = LinearProbe(args.backend, 1, args.gemv_size, args.gemv_size)
    for _ in range(2):
        probe.seconds()  # warm-up
    rounds = []
    for _ in range(args.repeats):
        measured = {}  # checkpoint_layout -> (tokens/s, fraction of the roofline, bandwidth)
        for checkpoint_layout in (False, True):
            steps, gemvs = time_minibatch_decode(model_dir, args.backend, args.prompt_len, args.steps,
                                                 checkpoint_layout, probe)
            # (step_bytes / step) / (probe bytes / gemv): this step's speed over the roofline beside it
            fractions = [step_bytes * gemv / (probe.weight_bytes * step) for step, gemv in zip(steps, gemvs,
                                                                                                strict=True)]
            measured[checkpoint_layout] = (1 / statistics.median(steps), statistics.median(fractions),
                                           probe.weight_bytes / statistics.median(gemvs))
        bandwidth = measured[False][2]
        rounds.append({"gemv_bandwidth_bytes_per_s": bandwidth, "roofline_tokens_per_s": bandwidth / step_bytes,
                       "minibatch_tokens_per_s": measured[False][0], "fraction_of_roofline": measured[False][1],
                       "checkpoint_layout_tokens_per_s": measured[True][0],
                       "checkpoint_layout_fraction_of_roofline": measured[True][1]})
    result = {"model": name, "parameters": config.num_parameters, "weight_bytes_per_step": step_bytes,
              **{key: statistics.median(r[key] for r in rounds) for key in rounds[0]}, "rounds": rounds}
    result["projections"] = projection_bandwidths(model_dir, args.backend, args.repeats)
    if not args.no_hf:  # on the same kind of processor: the CPU for numpy, the GPU for gpu
        hf = time_hf_decode(model_dir, args.prompt_len, args.steps, "cpu" if args.backend == "numpy" else "cuda")
        if hf is not None:
            result["hf_transformers_tokens_per_s"] = 1 / statistics.median(hf)
            result["minibatch_over_hf"] = result["minibatch_tokens_per_s"] / result["hf_transformers_tokens_per_s"]
    return result


def print_table(results: list[dict]) -> None:
    header = (f"{'model':<22}{'params':>12}{'MB/step':>10}{'GB/s':>7}{'roofline':>10}{'minibatch':>11}{'of roof':>9}"
              f"{'rounds':>17}{'ckpt layout':>13}{'of roof':>9}{'HF':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        hf = f"{r['hf_transformers_tokens_per_s']:.1f}" if "hf_transformers_tokens_per_s" in r else "-"
        each = " " + " ".join(f"{x['fraction_of_roofline']:.0%}" for x in r["rounds"])
        print(f"{r['model']:<22}{r['parameters']:>12,}{r['weight_bytes_per_step'] / 1e6:>10.1f}"
              f"{r['gemv_bandwidth_bytes_per_s'] / 1e9:>7.1f}{r['roofline_tokens_per_s']:>10.1f}"
              f"{r['minibatch_tokens_per_s']:>11.1f}{r['fraction_of_roofline']:>9.0%}{each:>17}"
              f"{r['checkpoint_layout_tokens_per_s']:>13.1f}{r['checkpoint_layout_fraction_of_roofline']:>9.0%}"
              f"{hf:>8}")
    print("\n(tokens/s, batch 1, medians of the rounds. GB/s = the measured GEMV bandwidth; roofline = bandwidth / "
          "weight bytes per step;\n rounds = each round's median, over its steps, of a step's speed over the "
          "roofline of a GEMV run right after it;\n minibatch: q/k/v and gate/up stacked, matrices in decode_order; "
          "ckpt layout: the checkpoint's separate row-major matrices)")


def print_projections(results: list[dict]) -> None:
    for r in results:
        probe = r["gemv_bandwidth_bytes_per_s"] / 1e9
        print(f"\n{r['model']}: each GEMV alone (batch 1, read cold), beside the {probe:.1f} GB/s of the large probe")
        for name, p in r["projections"].items():
            shape = " x ".join(str(n) for n in p["shape"])
            print(f"  {name:<14}{shape:>14}{p['bytes'] / 1e6:>9.2f} MB{p['bandwidth_bytes_per_s'] / 1e9:>8.1f} GB/s"
                  f"{p['bandwidth_bytes_per_s'] / r['gemv_bandwidth_bytes_per_s']:>8.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy", choices=["numpy", "gpu"])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=9,
                        help="rounds per model (median taken; a busy spell can sink a round or two)")
    parser.add_argument("--gemv-size", type=int, default=8192, help="rows and columns of the bandwidth GEMV")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--skip-135m", action="store_true", help="only the embedded model")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/decode_<backend>.json)")
    args = parser.parse_args()

    results = [benchmark_model("tiny-target (embedded)", DEFAULT_MODEL, args)]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_135m:
            model_dir = write_smollm2_shaped(Path(tmp) / "smollm2-135m-shaped")
            results.append(benchmark_model("SmolLM2-135M-shaped", model_dir, args))
    print_table(results)
    print_projections(results)
    out = args.out or RESULTS / f"decode_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "decode", "backend": args.backend, "machine": platform.platform(),
              "processor": platform.processor(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
              "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
