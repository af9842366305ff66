"""How decode throughput scales with batch size, and where a decode step's time goes.

Part of the serving benchmark (``benchmarks/serving.py``): pure decode steps at growing
batch sizes beside the memory roofline, on any checkpoint (the benchmark writes a
SmolLM2-135M-shaped one), with each backend function timed to split a step into phases.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from decode import measure_gemm_flops, measure_gemv_bandwidth, weight_bytes_per_step

from minibatch.backend import get_backend
from minibatch.checkpoint import load_weights
from minibatch.config import ModelConfig
from minibatch.kv_cache import ContiguousKVCache
from minibatch.model import ForwardBatch, ModelRunner


def decode_scaling(model_dir: Path, backend: str, batch_sizes: list[int], prompt_len: int, steps: int,
                   rounds: int = 3, gemv_size: int = 8192, gemm_size: int = 2048) -> dict[str, Any]:
    """Tokens/s of pure decode steps at each batch size (prefill excluded), beside the
    two rooflines measured in the same run, and where a step's time goes.

    * memory: ``batch * bandwidth / weight bytes per step`` (a large GEMV's bandwidth);
    * compute: ``GEMM FLOP/s / (2 FLOPs per weight)`` tokens/s whatever the batch (a
      large square GEMM's rate). The smaller of the two bounds each batch size; their
      ratio is the most a full batch can gain over batch 1 on this machine.

    All sequences are prefilled once; each batch size then decodes its first ``batch``
    sequences from the end of the prompt, overwriting the same cache positions. The batch
    sizes take turns, ``rounds`` times (1, 2, ..., 32, 1, 2, ...), so that load from
    elsewhere on the machine falls on all of them alike; each turn starts with one untimed
    warm-up step, and a batch size's time is the median of its ``rounds * steps`` steps.
    A last turn per batch size times each backend function (:func:`time_phases`).
    """
    config = ModelConfig.from_dir(model_dir)
    runner = ModelRunner(config, load_weights(model_dir, config), get_backend(backend))
    size = max(batch_sizes)
    cache = ContiguousKVCache(size, prompt_len + steps + 1)
    kv = runner.new_kv(cache.num_blocks, cache.block_size)
    prompts = np.random.default_rng(1).integers(3, min(config.vocab_size, 256), (size, prompt_len)).tolist()
    for seq in range(size):
        cache.allocate(seq)
    entries = [(prompts[s], 0, cache.block_table(s), cache.slot_mapping(s, np.arange(prompt_len))) for s in range(size)]
    first = np.argmax(runner.run(ForwardBatch.build(entries), kv), axis=-1).tolist()
    times: dict[int, list[float]] = {batch: [] for batch in batch_sizes}
    for _ in range(rounds):
        for batch in batch_sizes:
            times[batch] += time_decode_steps(runner, cache, kv, first[:batch], prompt_len, steps + 1)[1:]
    rows = [{"batch_size": batch, "step_s": statistics.median(times[batch]),
             "tokens_per_s": batch / statistics.median(times[batch]),
             "phases_s": time_phases(runner, cache, kv, first[:batch], prompt_len, steps)} for batch in batch_sizes]
    bandwidth = measure_gemv_bandwidth(backend, gemv_size, gemv_size)
    peak_flops = measure_gemm_flops(backend, gemm_size)
    step_bytes = weight_bytes_per_step(runner.weights, config.tie_word_embeddings)
    compute_bound = peak_flops / (2 * step_bytes / 4)  # tokens/s: 2 FLOPs per float32 weight per token
    for row in rows:
        row["speedup_vs_batch_1"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["roofline_tokens_per_s"] = row["batch_size"] * bandwidth / step_bytes
        row["compute_roofline_tokens_per_s"] = compute_bound
        # every float32 weight read is one multiply-add per sequence: 2 FLOPs per 4 bytes
        gemm = row["phases_s"]["projections"] + row["phases_s"]["lm_head"]
        row["gemm_flops_per_s"] = row["batch_size"] * step_bytes / 2 / gemm if gemm else None
        # the most this batch could gain over batch 1 if all but its linear layers took no time
        row["speedup_bound_linear_only"] = row["batch_size"] * rows[0]["step_s"] / gemm if gemm else None
    return {"model": str(model_dir.name), "parameters": config.num_parameters, "prompt_len": prompt_len,
            "decode_steps": steps, "rounds": rounds, "gemv_bandwidth_bytes_per_s": bandwidth,
            "gemm_peak_flops_per_s": peak_flops, "weight_bytes_per_step": step_bytes,
            "roofline_ratio_largest_vs_1": min(rows[-1]["roofline_tokens_per_s"], compute_bound)
            / min(rows[0]["roofline_tokens_per_s"], compute_bound),
            "rows": rows, "ratio_largest_vs_1": rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]}


def time_decode_steps(runner: ModelRunner, cache: ContiguousKVCache, kv: Any, tokens: list[int], prompt_len: int,
                      steps: int) -> list[float]:
    """Seconds of each of ``steps`` greedy decode steps of sequences ``0..len(tokens)-1``."""
    times = []
    for step in range(steps):
        batch = decode_batch(cache, tokens, prompt_len + step)
        start = time.perf_counter()
        logits = runner.run(batch, kv)  # host logits: a whole step
        times.append(time.perf_counter() - start)
        tokens = np.argmax(logits, axis=-1).tolist()
    return times


def decode_batch(cache: ContiguousKVCache, tokens: list[int], position: int) -> ForwardBatch:
    """One decode step of sequences ``0..len(tokens)-1``, all at ``position``."""
    return ForwardBatch.build([([token], position, cache.block_table(s), cache.slot_mapping(s, np.array([position])))
                               for s, token in enumerate(tokens)])


PHASES = ("projections", "lm_head", "attention", "elementwise", "python", "batch_and_sampling")
PHASE_LABELS = dict(zip(PHASES, ("projections", "LM head", "attention", "elementwise", "python", "batch+argmax"),
                        strict=True))


def time_phases(runner: ModelRunner, cache: ContiguousKVCache, kv: Any, tokens: list[int], prompt_len: int,
                steps: int) -> dict[str, float]:
    """Median seconds per decode step in each phase, from ``steps`` steps (after a warm-up)
    with every backend function timed:

    * ``projections``: the linear layers of the decoder blocks (GEMMs);
    * ``lm_head``: the final linear layer to vocabulary logits;
    * ``attention``: writing K/V into the cache and attending over it;
    * ``elementwise``: everything else the backend does (norms, RoPE, SwiGLU, embedding);
    * ``python``: the rest of ``ModelRunner.run`` (the layer loop, host/device copies);
    * ``batch_and_sampling``: building the ``ForwardBatch`` and the greedy argmax.
    """
    ops = runner.backend
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def timed(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            ops.synchronize()
            phase = ("lm_head" if args[1] is runner.weights.lm_head else "projections") if name == "linear" \
                else "attention" if "attention" in name or name in ("write_kv", "copy_blocks") else "elementwise"
            spent[phase] += time.perf_counter() - start
            return result
        return call

    functions = {f.name: timed(f.name, getattr(ops, f.name)) for f in fields(ops)
                 if callable(getattr(ops, f.name)) and f.name not in ("xp", "name")}
    runner.backend = replace(ops, **functions)
    per_step: dict[str, list[float]] = {phase: [] for phase in PHASES}
    try:
        for step in range(steps + 1):
            spent.update(dict.fromkeys(PHASES, 0.0))
            start = time.perf_counter()
            batch = decode_batch(cache, tokens, prompt_len + step)
            built = time.perf_counter()
            logits = runner.run(batch, kv)
            ran = time.perf_counter()
            tokens = np.argmax(logits, axis=-1).tolist()
            spent["python"] = (ran - built) - sum(spent[p] for p in PHASES[:4])
            spent["batch_and_sampling"] = (built - start) + (time.perf_counter() - ran)
            if step:  # the first is a warm-up
                for phase in PHASES:
                    per_step[phase].append(spent[phase])
    finally:
        runner.backend = ops
    return {phase: statistics.median(values) for phase, values in per_step.items()}
