"""Decode time per step against batch size, float32 against int4 weights, beside the roofline.

A decode step reads every weight once whatever the batch size, and does ``2 x weights``
FLOPs per sequence. So its time is bounded below by two lines:

* **memory**: ``weight bytes per step / bandwidth``, flat in the batch size. Weights
  stored at 4.5-4.6 bits instead of 32 lower this line, which is the whole speed-up of
  weight-only int4 (the embedding/lm_head stays float32, so the whole step reads ~3x fewer
  bytes on a SmolLM2-135M shape, not ~7x);
* **compute**: ``2 x weights x batch / FLOP/s``, rising with the batch size and the same for
  every format (the multiply-adds are float32 either way).

The roofline is the larger of the two. Where it turns from flat to rising, the int4 gain
fades: that is MARLIN's curve, near-full speed-up up to batch 16-32 on a GPU, falling
behind at 64-128. Bandwidth (a large float32 GEMV) and FLOP/s (a large float32 GEMM) are
measured in the same run, on the same backend.

On the NumPy backend the quantized path is the *readable* one: every call re-expands the
packed weights to float32 (:func:`minibatch.quant.quantized_matmul`), so it moves more
bytes than float32, not fewer, and is slower. Its numbers here are measured honestly and
sit far above its roofline, which assumes a fused kernel. ``--backend gpu`` runs the fused
Numba CUDA kernels of ``minibatch_gpu/quant.py``, which read the packed bytes and
dequantize in registers.

The model is a random checkpoint with SmolLM2-135M's shapes (``benchmarks/decode.py``).
int4-g128 cannot store it (its 576-wide inputs are not a multiple of 128), so int4-g64 is
the group-wise int4 default here; q4_0 is llama.cpp's format.

    python benchmarks/quant_speed.py [--backend numpy|gpu] [--quick] [--schemes f32,int4-g64,q4_0]

It prints a table, writes ``benchmarks/results/quant_speed_<backend>.json`` and plots
``benchmarks/results/quant_speed.png`` (``quant_speed_gpu.png`` for the GPU backend).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from decode import measure_gemv_bandwidth, median_linear_seconds, weight_bytes_per_step, write_smollm2_shaped

from minibatch.backend import get_backend
from minibatch.checkpoint import load_weights
from minibatch.config import ModelConfig
from minibatch.kv_cache import ContiguousKVCache, kv_bytes_per_token
from minibatch.model import ForwardBatch, ModelRunner, ModelWeights
from minibatch.quant import PROJECTIONS, quantize_model

RESULTS = Path(__file__).parent / "results"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
QUICK_BATCH_SIZES = (1, 8, 64)
DEFAULT_SCHEMES = ("f32", "int4-g64", "q4_0")


def measure_gemm_flops(backend_name: str, tokens: int = 512, size: int = 4096, repeats: int = 7) -> float:
    """FLOP/s of a float32 ``[tokens, size] @ [size, size]``: the compute roofline."""
    return 2 * tokens * size * size / median_linear_seconds(backend_name, tokens, size, size, repeats)


def multiply_adds_per_token(weights: ModelWeights) -> int:
    """Weights a token multiplies by in one step: every projection and the lm_head."""
    projections = sum(int(np.prod(getattr(layer, name).shape)) for layer in weights.layers for name in PROJECTIONS)
    return projections + int(np.prod(weights.lm_head.shape))


def roofline(step_bytes: int, flops_per_token: int, batch_size: int, bandwidth: float, gemm_flops: float,
             kv_bytes: int = 0) -> dict:
    """Lower bounds on a step's time: reading the weights (and the KV) once, and the FLOPs."""
    memory_s = (step_bytes + kv_bytes) / bandwidth
    compute_s = 2 * flops_per_token * batch_size / gemm_flops
    return {"memory_s": memory_s, "compute_s": compute_s, "roofline_s": max(memory_s, compute_s)}


def time_decode(runner: ModelRunner, batch_size: int, prompt_len: int, steps: int) -> list[float]:
    """Seconds per decode step for ``batch_size`` sequences (one token each per step),
    after one untimed prefill of ``prompt_len`` tokens per sequence."""
    config = runner.config
    cache = ContiguousKVCache(max_seqs=batch_size, max_len=prompt_len + steps + 1)
    kv = runner.new_kv(cache.num_blocks, cache.block_size)
    rng = np.random.default_rng(batch_size)
    new = [list(rng.integers(0, min(config.vocab_size, 256), prompt_len)) for _ in range(batch_size)]
    position, times = 0, []
    for seq in range(batch_size):
        cache.allocate(seq)
    for _ in range(steps + 1):
        batch = ForwardBatch.build([(tokens, position, cache.block_table(seq),
                                     cache.slot_mapping(seq, np.arange(position, position + len(tokens))))
                                    for seq, tokens in enumerate(new)])
        start = time.perf_counter()
        logits = runner.run(batch, kv)  # copies the logits to the host: a whole step
        times.append(time.perf_counter() - start)
        position += len(new[0])
        new = [[int(token)] for token in np.argmax(logits, axis=-1)]
    return times[1:]  # drop the prefill


def benchmark_scheme(scheme: str, float_weights: ModelWeights, config: ModelConfig, args: argparse.Namespace,
                     bandwidth: float, gemm_flops: float) -> list[dict]:
    weights = float_weights if scheme == "f32" else quantize_model(float_weights, scheme)
    runner = ModelRunner(config, weights, get_backend(args.backend))
    step_bytes = weight_bytes_per_step(weights, config.tie_word_embeddings)
    flops_per_token = multiply_adds_per_token(weights)
    rows = []
    for batch_size in args.batch_sizes:
        times = time_decode(runner, batch_size, args.prompt_len, args.steps)
        context = args.prompt_len + args.steps // 2  # the middle step's context
        kv_bytes = batch_size * context * kv_bytes_per_token(config)
        row = {"scheme": scheme, "batch_size": batch_size, "seconds_per_step": statistics.median(times),
               "steps": len(times), "weight_bytes_per_step": step_bytes,
               **roofline(step_bytes, flops_per_token, batch_size, bandwidth, gemm_flops, kv_bytes)}
        row["tokens_per_s"] = batch_size / row["seconds_per_step"]
        row["fraction_of_roofline"] = row["roofline_s"] / row["seconds_per_step"]
        rows.append(row)
        print(f"  {scheme:<10} batch {batch_size:>3}: {row['seconds_per_step'] * 1e3:9.1f} ms/step "
              f"(roofline {row['roofline_s'] * 1e3:.1f} ms)", flush=True)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over float32 at the same batch size, measured and on the roofline."""
    base = {r["batch_size"]: r for r in rows if r["scheme"] == "f32"}
    for r in rows:
        if r["batch_size"] in base:
            r["speedup_vs_f32"] = base[r["batch_size"]]["seconds_per_step"] / r["seconds_per_step"]
            r["roofline_speedup_vs_f32"] = base[r["batch_size"]]["roofline_s"] / r["roofline_s"]


def print_table(rows: list[dict], bandwidth: float, gemm_flops: float) -> None:
    print(f"\nmeasured GEMV bandwidth {bandwidth / 1e9:.2f} GB/s, GEMM {gemm_flops / 1e9:.1f} GFLOP/s (float32)\n")
    header = (f"{'scheme':<10}{'batch':>6}{'MB/step':>9}{'ms/step':>10}{'roof ms':>9}{'of roof':>9}"
              f"{'tok/s':>9}{'x f32':>7}{'roof x f32':>12}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        speedup = f"{r['speedup_vs_f32']:.2f}" if "speedup_vs_f32" in r else "-"
        roof_speedup = f"{r['roofline_speedup_vs_f32']:.2f}" if "roofline_speedup_vs_f32" in r else "-"
        print(f"{r['scheme']:<10}{r['batch_size']:>6}{r['weight_bytes_per_step'] / 1e6:>9.1f}"
              f"{r['seconds_per_step'] * 1e3:>10.1f}{r['roofline_s'] * 1e3:>9.1f}{r['fraction_of_roofline']:>9.0%}"
              f"{r['tokens_per_s']:>9.1f}{speedup:>7}{roof_speedup:>12}")
    print("\nroof ms = max(weight+KV bytes / bandwidth, 2 x weights x batch / GEMM FLOP/s); "
          "x f32 = float32 time / this time, same batch")


def why_note(backend: str) -> str:
    if backend == "numpy":
        return ("NumPy backend: quantized_matmul re-expands every packed weight to float32 on every call, so a "
                "quantized step reads the packed bytes AND writes and reads float32 copies of them: it is slower "
                "than float32, and its roofline (which assumes a fused kernel reading only the packed bytes) is "
                "not a bound it can approach. The speed-up needs the fused kernels of --backend gpu.")
    return ("GPU backend: the fused kernels of minibatch_gpu/quant.py read the packed bytes and dequantize in "
            "registers (GEMV kernel up to 4 tokens, tiled kernel above).")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: time per step against the batch, measured (solid) and roofline (dashed).
    Right: speed-up over float32 at the same batch, measured and on the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 4))
    batches = sorted({r["batch_size"] for r in rows})
    for index, scheme in enumerate(dict.fromkeys(r["scheme"] for r in rows)):
        mine = [r for r in rows if r["scheme"] == scheme]
        x, color = [r["batch_size"] for r in mine], f"C{index}"
        time_ax.plot(x, [r["seconds_per_step"] * 1e3 for r in mine], "o-", color=color, label=f"{scheme} measured")
        time_ax.plot(x, [r["roofline_s"] * 1e3 for r in mine], "--", color=color, label=f"{scheme} roofline")
        if scheme != "f32" and all("speedup_vs_f32" in r for r in mine):
            speed_ax.plot(x, [r["speedup_vs_f32"] for r in mine], "o-", color=color, label=f"{scheme} measured")
            speed_ax.plot(x, [r["roofline_speedup_vs_f32"] for r in mine], "--", color=color,
                          label=f"{scheme} roofline")
    time_ax.set(yscale="log", ylabel="ms per decode step", title=title)
    speed_ax.axhline(1, color="gray", linewidth=0.8)
    speed_ax.set(ylim=(0, None), ylabel="speed-up over float32 (same batch)", title="the gain fades with the batch")
    for ax in (time_ax, speed_ax):
        ax.set(xscale="log", xlabel="batch size (sequences decoding)")
        ax.set_xticks(batches, labels=[str(b) for b in batches])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy", choices=["numpy", "gpu"])
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES), help="comma-separated; f32 is the baseline")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per batch size (median taken)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help=f"batch sizes {QUICK_BATCH_SIZES}, 2 steps each")
    parser.add_argument("--model", type=Path, default=None,
                        help="a float checkpoint instead of the SmolLM2-135M-shaped random one")
    args = parser.parse_args()
    args.batch_sizes = QUICK_BATCH_SIZES if args.quick else BATCH_SIZES
    args.steps = args.steps or (2 if args.quick else (16 if args.backend == "numpy" else 32))
    schemes = [s.strip() for s in args.schemes.split(",")]
    if "f32" not in schemes:
        schemes.insert(0, "f32")

    bandwidth = measure_gemv_bandwidth(args.backend)
    gemm_flops = measure_gemm_flops(args.backend)
    print(f"GEMV bandwidth {bandwidth / 1e9:.2f} GB/s, GEMM {gemm_flops / 1e9:.1f} GFLOP/s; backend {args.backend}")
    rows = []
    model_name = str(args.model) if args.model else "SmolLM2-135M-shaped (random)"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_smollm2_shaped(Path(tmp) / "smollm2-135m-shaped")
        config = ModelConfig.from_dir(model_dir)
        float_weights = load_weights(model_dir, config)
        for scheme in schemes:
            rows += benchmark_scheme(scheme, float_weights, config, args, bandwidth, gemm_flops)
    add_speedups(rows)
    print_table(rows, bandwidth, gemm_flops)
    print("\n" + why_note(args.backend))

    RESULTS.mkdir(exist_ok=True)
    report = {"benchmark": "quant_speed", "backend": args.backend, "model": model_name,
              "gemv_bandwidth_bytes_per_s": bandwidth, "gemm_flops_per_s": gemm_flops,
              "machine": platform.platform(), "processor": platform.processor(),
              "args": {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
                       for k, v in vars(args).items()},
              "note": why_note(args.backend), "rows": rows}
    out = RESULTS / f"quant_speed_{args.backend}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = RESULTS / ("quant_speed.png" if args.backend == "numpy" else f"quant_speed_{args.backend}.png")
    plot(rows, png, f"{model_name}, {args.backend}")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
