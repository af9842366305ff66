"""The serving benchmark's numbers, tables and figures.

Summaries of each system's run (throughput, latency percentiles from the ``EventLog``,
KV use), the memory comparison at equal KV memory, the printed tables and the
``serving_*.png`` plots of ``benchmarks/serving.py``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
from serving_scaling import PHASE_LABELS, PHASES
from serving_systems import CHUNKED, LABELS, PREFILL_FIRST, KVSample, RunResult, ServingSetup
from workload import Request

from minibatch.config import ModelConfig
from minibatch.kv_cache import kv_bytes_per_token

# ---------------------------------------------------------------------------- summaries


def summarize(result: RunResult, requests: list[Request]) -> dict[str, Any]:
    """Throughput, latency percentiles (from the ``EventLog``), preemptions and KV use."""
    log, samples = result.log, result.kv_samples
    records = [log.requests[r.request_id] for r in requests]
    makespan = max(r.finished_time for r in records) - result.start
    output_tokens = sum(len(tokens) for tokens in result.outputs.values())
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    latency = log.summary()
    return {
        "label": LABELS.get(result.name, result.name), "settings": result.settings,
        "completed": all(len(result.outputs.get(r.request_id, [])) == r.max_tokens for r in requests),
        "makespan_s": makespan, "cpu_s": result.cpu_seconds, "num_steps": len(log.steps),
        "output_tokens": output_tokens, "output_tokens_per_s": output_tokens / makespan,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / makespan,
        "requests_per_s": len(requests) / makespan,
        "output_tokens_per_cpu_s": output_tokens / result.cpu_seconds,
        **{f"{key}_s": latency[key] for key in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p50",
                                                 "e2e_p99") if key in latency},
        "preemptions": int(latency["preemptions"]),
        "prefill_tokens_computed": sum(s.num_prefill_tokens for s in log.steps),
        "padding_tokens_computed": sum(s.padding_tokens for s in samples),
        "prompt_padding_tokens_computed": sum(sample.padding_tokens for sample, step in zip(samples, log.steps,
                                                                                           strict=True)
                                              if step.num_prefill_seqs),
        "row_steps_per_output_token": sum(s.num_running for s in log.steps) / output_tokens,
        # every token row a forward pass computed: prompts (recomputed ones too), decodes, padding
        "tokens_computed": sum(s.num_tokens for s in log.steps) + sum(s.padding_tokens for s in samples),
        "peak_running": max(s.num_running for s in log.steps),
        "mean_running": statistics.fmean(s.num_running for s in log.steps),
        "kv_utilisation_mean": statistics.fmean(s.blocks_used / (s.blocks_used + s.blocks_free) for s in log.steps),
        "kv_live_fraction_mean": statistics.fmean(s.live_slots / result.kv_slots for s in samples),
        "kv_waste_mean": mean_waste(samples),
        "adjacent_block_fraction": adjacent_fraction(samples),
        "ttft_s": [r.ttft for r in records], "tpot_s": [r.tpot for r in records],
    }


def adjacent_fraction(samples: list[KVSample]) -> float:
    """Of all consecutive block-table entries over all steps, the fraction whose block is
    the neighbour (id + 1) of the one before: how much of the paged reads stream."""
    return sum(s.adjacent_pairs for s in samples) / max(1, sum(s.block_pairs for s in samples))


def mean_waste(samples: list[KVSample], row_len: int | None = None) -> float:
    """Mean over steps of (allocated slots not holding a token) / (allocated slots). With
    ``row_len``, as if every sequence had reserved a contiguous row of that length."""
    fractions = []
    for s in samples:
        allocated = s.num_seqs * row_len if row_len else s.allocated_slots
        if allocated:
            fractions.append(1 - s.live_slots / allocated)
    return statistics.fmean(fractions) if fractions else 0.0


RATIO_HEADERS = {"output_tokens_per_s": "out tok/s", "total_tokens_per_s": "tok/s", "requests_per_s": "req/s",
                 "output_tokens_per_cpu_s": "tok/CPU-s",
                 "ttft_p50_s": "TTFT p50", "ttft_p99_s": "TTFT p99", "tpot_p50_s": "TPOT p50",
                 "tpot_p99_s": "TPOT p99", "num_steps": "steps"}
RATIO_KEYS = tuple(RATIO_HEADERS)


def ratios_to(baseline: dict[str, Any], summary: dict[str, Any]) -> dict[str, float | None]:
    """``summary / baseline`` for every comparable number (None where one is missing)."""
    return {key: summary[key] / baseline[key] if baseline.get(key) and summary.get(key) is not None else None
            for key in RATIO_KEYS}


# ------------------------------------------------------------------------------ memory


def memory_report(setup: ServingSetup, config: ModelConfig, static: RunResult, chunked: RunResult,
                  bound: RunResult, requests: list[Request]) -> dict[str, Any]:
    """At equal KV memory: sequences that fit, and the fraction of allocated KV that holds
    no token, for contiguous max-length rows and for paged blocks."""
    block = setup.block_size
    mean_blocks = statistics.fmean(-(-(len(r.prompt_token_ids) + r.max_tokens) // block) for r in requests)
    return {
        "kv_slots": setup.kv_slots, "kv_bytes": setup.kv_slots * kv_bytes_per_token(config),
        "row_len": setup.row_len, "max_model_len": config.max_model_len, "block_size": block,
        "num_blocks": setup.num_blocks,
        "contiguous_seqs_fit": setup.kv_slots // setup.row_len,
        "contiguous_seqs_fit_max_model_len_rows": setup.kv_slots // config.max_model_len,
        "paged_seqs_fit_peak_measured": max(s.num_running for s in bound.log.steps),
        "paged_seqs_fit_mean_measured": statistics.fmean(s.num_running for s in bound.log.steps),
        "paged_seqs_fit_computed": setup.num_blocks / mean_blocks,
        "paged_memory_bound_preemptions": sum(s.num_preemptions for s in bound.log.steps),
        "contiguous_waste_static_run": mean_waste(static.kv_samples),
        "contiguous_waste_same_schedule": mean_waste(chunked.kv_samples, row_len=setup.row_len),
        "paged_waste": mean_waste(chunked.kv_samples),
        "paged_waste_memory_bound": mean_waste(bound.kv_samples),
        "paged_waste_goal": 0.04,
        "adjacent_block_fraction": adjacent_fraction(chunked.kv_samples),
    }


# ---------------------------------------------------------------------------- printing


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def print_systems(summaries: dict[str, dict[str, Any]]) -> None:
    header = (f"{'system':<30}{'out tok/s':>10}{'tok/s':>9}{'req/s':>7}{'tok/CPU-s':>10}{'TTFT p50':>10}{'p99':>8}"
              f"{'TPOT p50':>10}{'p99':>7}{'steps':>7}{'preempt':>8}{'KV used':>8}{'KV live':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for s in summaries.values():
        print(f"{s['label']:<30}{s['output_tokens_per_s']:>10.1f}{s['total_tokens_per_s']:>9.1f}"
              f"{s['requests_per_s']:>7.2f}{s['output_tokens_per_cpu_s']:>10.1f}"
              f"{ms(s.get('ttft_p50_s')):>10}{ms(s.get('ttft_p99_s')):>8}"
              f"{ms(s.get('tpot_p50_s')):>10}{ms(s.get('tpot_p99_s')):>7}{s['num_steps']:>7}"
              f"{s['preemptions']:>8}{s['kv_utilisation_mean']:>8.0%}{s['kv_live_fraction_mean']:>8.0%}")
    print("(tok/CPU-s = output tokens per second of this process's CPU time, steadier than wall time on a busy "
          "machine;\n TTFT/TPOT in ms; KV used = allocated blocks/rows of the pool, KV live = slots holding a token)")


def print_ratios(ratios: dict[str, dict[str, float | None]], summaries: dict[str, dict[str, Any]]) -> None:
    header = f"{'ratio to static batching':<30}" + "".join(f"{RATIO_HEADERS[k]:>10}" for k in RATIO_KEYS)
    print("\n" + header + "\n" + "-" * len(header))
    for name, row in ratios.items():
        cells = "".join(f"{'-' if v is None else f'{v:.2f}x':>10}" for v in row.values())
        print(f"{summaries[name]['label']:<30}{cells}")
    print("(throughput: higher is better; latencies and steps: lower is better)")


def print_by_workload(by_workload: dict[str, dict[str, Any]], max_num_seqs: int) -> None:
    print(f"\ncontinuous vs static batching by output-length distribution (same run, same prompts, max_num_seqs "
          f"{max_num_seqs}); goal: continuous >= 3x static")
    header = (f"{'workload':<10}{'prompt':>8}{'  output length':<32}{'p50':>5}{'mean':>6}{'max':>5}{'static rows':>12}"
              f"{'work':>7}{'prefill-first':>15}{'chunked':>9}{'(CPU time)':>17}   chunked, each round")
    print(header + "\n" + "-" * len(header))
    for name, w in by_workload.items():
        dist = w["output_len"]
        shape = (f"{dist['kind']} {dist['low']}..{dist['high']}" if dist["median"] is None
                 else f"lognormal p50 {dist['median']:g} s {dist['sigma']:g} cap {dist['high']}")
        wall, cpu = w["ratio_to_static"], w["cpu_ratio_to_static"]
        print(f"{name:<10}{w['prompt_len_mean']:>8.0f}  {shape:<30}{w['output_len_p50']:>5.0f}"
              f"{w['output_len_mean']:>6.0f}{w['output_len_max']:>5}{w['static_rows_per_output_token']:>11.2f}x"
              f"{w['work_ratio'][CHUNKED]:>6.2f}x{wall[PREFILL_FIRST]:>14.2f}x"
              f"{wall[CHUNKED]:>8.2f}x{cpu[PREFILL_FIRST]:>8.2f}x /{cpu[CHUNKED]:>6.2f}x"
              f"   {' '.join(f'{r:.2f}' for r in w['round_ratios'][CHUNKED])}")
    print("(output tokens per second, and per CPU-second, over static batching's, from each system's median run; "
          "each round:\n the ratio within each round of the three systems. static rows = the decode rows "
          "static batching\n computed per wanted token, about E[max of B outputs] / E[output]: the gain of a "
          "continuous batcher that wasted no step\n if prompts cost nothing; work = all the token rows static "
          "batching computed (padded prompts too) over those\n chunked prefill computed: the gain if every row cost "
          "the same)")


def print_memory(memory: dict[str, Any], bound: dict[str, Any], static: dict[str, Any]) -> None:
    print(f"\nKV memory {memory['kv_bytes'] / 2**20:.1f} MiB = {memory['kv_slots']} token slots "
          f"= {memory['num_blocks']} blocks of {memory['block_size']}")
    print(f"  sequences that fit: contiguous rows of {memory['row_len']} (longest prompt + longest output) "
          f"{memory['contiguous_seqs_fit']}, rows of max_model_len {memory['max_model_len']} "
          f"{memory['contiguous_seqs_fit_max_model_len_rows']}; paged: peak {memory['paged_seqs_fit_peak_measured']} "
          f"running (mean {memory['paged_seqs_fit_mean_measured']:.1f}, "
          f"{memory['paged_memory_bound_preemptions']} preemptions), "
          f"computed {memory['paged_seqs_fit_computed']:.1f} average sequences")
    print(f"  wasted KV (allocated, holding no token): contiguous {memory['contiguous_waste_static_run']:.1%} "
          f"(static run), {memory['contiguous_waste_same_schedule']:.1%} (continuous schedule); "
          f"paged {memory['paged_waste']:.1%} (memory-bound run {memory['paged_waste_memory_bound']:.1%}); "
          f"goal < {memory['paged_waste_goal']:.0%}")
    print(f"  paged block tables in order (an entry's block the neighbour of the one before): "
          f"{memory['adjacent_block_fraction']:.1%} (memory-bound run {bound['adjacent_block_fraction']:.1%})")
    print(f"  the memory-bound paged run (chunked prefill, max_num_seqs={bound['settings']['max_num_seqs']}): "
          f"{bound['output_tokens_per_s']:.1f} output tokens/s "
          f"({bound['output_tokens_per_s'] / static['output_tokens_per_s']:.2f}x static batching), "
          f"TTFT p50 {ms(bound.get('ttft_p50_s'))} ms, TPOT p50 {ms(bound.get('tpot_p50_s'))} ms")


def print_scaling(scaling: dict[str, Any]) -> None:
    print(f"\ndecode scaling, {scaling['model']} ({scaling['parameters'] / 1e6:.1f}M parameters), medians of "
          f"{scaling['rounds']} x {scaling['decode_steps']} steps after a {scaling['prompt_len']}-token prompt")
    header = (f"{'batch':>6}{'ms/step':>10}{'tok/s':>10}{'vs 1':>7}{'memory':>9}{'compute':>9}{'of bound':>10}"
              f"{'GEMM GFLOP/s':>14}{'GEMM-only bound':>17}")
    print(header + "\n" + "-" * len(header))
    for row in scaling["rows"]:
        flops, gemm_only = row["gemm_flops_per_s"], row.get("speedup_bound_linear_only")
        bound = min(row["roofline_tokens_per_s"], row["compute_roofline_tokens_per_s"])
        print(f"{row['batch_size']:>6}{row['step_s'] * 1e3:>10.1f}{row['tokens_per_s']:>10.1f}"
              f"{row['speedup_vs_batch_1']:>6.1f}x{row['roofline_tokens_per_s']:>9.0f}"
              f"{row['compute_roofline_tokens_per_s']:>9.0f}{row['tokens_per_s'] / bound:>10.0%}"
              f"{'-' if flops is None else f'{flops / 1e9:.1f}':>14}"
              f"{'-' if flops is None else f'{gemm_only:.1f}x':>17}")
    print(f"(rooflines in tokens/s: memory = batch x {scaling['gemv_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s measured "
          f"GEMV bandwidth / {scaling['weight_bytes_per_step'] / 1e6:.1f} MB of weights per step; compute = "
          f"{scaling['gemm_peak_flops_per_s'] / 1e9:.0f} GFLOP/s measured square GEMM / 2 FLOPs per weight. "
          f"Together they allow batch {scaling['rows'][-1]['batch_size']} at most "
          f"{scaling['roofline_ratio_largest_vs_1']:.1f}x batch 1 on this machine. GEMM GFLOP/s = the rate the "
          "linear layers ran at; GEMM-only bound = the speed-up over batch 1 this batch would reach if "
          "everything but its linear layers took no time)")
    header = f"{'where a step goes (ms)':<24}" + "".join(f"{PHASE_LABELS[p]:>13}" for p in PHASES) + f"{'total':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in scaling["rows"]:
        phases = row["phases_s"]
        print(f"{'batch ' + str(row['batch_size']):<24}" + "".join(f"{phases[p] * 1e3:>13.1f}" for p in PHASES)
              + f"{sum(phases.values()) * 1e3:>9.1f}")


# ------------------------------------------------------------------------------- plots


def plot_all(results: dict[str, RunResult], summaries: dict[str, dict[str, Any]], memory: dict[str, Any],
             scaling: dict[str, Any] | None, out_dir: Path) -> list[Path]:
    """Write the ``serving_*.png`` figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [plot_throughput(plt, summaries, out_dir / "serving_throughput.png"),
             plot_latency(plt, summaries, out_dir / "serving_latency.png"),
             plot_timeline(plt, results, summaries, out_dir / "serving_timeline.png"),
             plot_memory(plt, memory, out_dir / "serving_memory.png")]
    if scaling is not None:
        paths.append(plot_scaling(plt, scaling, out_dir / "serving_decode_scaling.png"))
    return paths


def plot_throughput(plt: Any, summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [s["label"] for s in summaries.values()]
    values = [s["output_tokens_per_s"] for s in summaries.values()]
    bars = ax.bar(labels, values, color=["#999999", "#4c72b0", "#55a868"])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value / values[0]:.2f}x", (bar.get_x() + bar.get_width() / 2, value), ha="center",
                    va="bottom")
    ax.margins(y=0.12)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput on the same workload (ratio to static batching)")
    return save(plt, fig, path)


def plot_latency(plt: Any, summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "tpot_s", "time per output token")):
        for s in summaries.values():
            values = np.sort([v * 1e3 for v in s[key] if v is not None])
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=s["label"])
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title.capitalize()} CDF")
    axes[1].legend()
    return save(plt, fig, path)


def plot_timeline(plt: Any, results: dict[str, RunResult], summaries: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.4 * len(results)), sharex=True, sharey=True)
    for ax, (name, result) in zip(np.atleast_1d(axes), results.items(), strict=True):
        steps = np.arange(len(result.log.steps))
        prefill = np.array([s.num_prefill_tokens for s in result.log.steps])
        decode = np.array([s.num_decode_seqs for s in result.log.steps])
        padding = np.array([s.padding_tokens for s in result.kv_samples])
        ax.bar(steps, prefill, width=1.0, color="#dd8452", label="prefill tokens")
        ax.bar(steps, decode, width=1.0, bottom=prefill, color="#4c72b0", label="decode tokens")
        ax.bar(steps, padding, width=1.0, bottom=prefill + decode, color="#bbbbbb", label="padding (wasted)")
        ax.set_yscale("symlog", linthresh=16)
        ax.set_ylabel("tokens / step")
        ax.set_title(summaries[name]["label"], fontsize=10)
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("step")
    return save(plt, fig, path)


def plot_memory(plt: Any, memory: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    fit = {"contiguous\n(max_model_len rows)": memory["contiguous_seqs_fit_max_model_len_rows"],
           "contiguous\n(workload max rows)": memory["contiguous_seqs_fit"],
           "paged\n(measured peak)": memory["paged_seqs_fit_peak_measured"]}
    axes[0].bar(list(fit), list(fit.values()), color=["#999999", "#999999", "#55a868"])
    axes[0].set_ylabel("sequences running at once")
    axes[0].set_title("Sequences that fit in equal KV memory")
    waste = {"contiguous\n(static run)": memory["contiguous_waste_static_run"],
             "contiguous\n(same schedule)": memory["contiguous_waste_same_schedule"],
             "paged": memory["paged_waste"]}
    axes[1].bar(list(waste), [100 * v for v in waste.values()], color=["#999999", "#999999", "#55a868"])
    axes[1].axhline(100 * memory["paged_waste_goal"], color="red", linestyle="--", label="goal")
    axes[1].set_ylabel("% of allocated KV holding no token")
    axes[1].set_title("Wasted KV memory (mean over steps)")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    return save(plt, fig, path)


def plot_scaling(plt: Any, scaling: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    batch = [r["batch_size"] for r in scaling["rows"]]
    measured = [r["tokens_per_s"] for r in scaling["rows"]]
    ax.plot(batch, measured, "o-", label="measured")
    ax.plot(batch, [measured[0] * b for b in batch], "--", color="gray", label="linear (batch x batch-1)")
    ax.plot(batch, [r["roofline_tokens_per_s"] for r in scaling["rows"]], ":", color="red",
            label="memory roofline")
    ax.plot(batch, [r["compute_roofline_tokens_per_s"] for r in scaling["rows"]], "-.", color="purple",
            label="compute roofline")
    if all(r.get("speedup_bound_linear_only") for r in scaling["rows"]):
        ax.plot(batch, [measured[0] * r["speedup_bound_linear_only"] for r in scaling["rows"]], "s:", color="green",
                markersize=3, label="if only the linear layers took time")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences decoding together")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode throughput vs batch size ({scaling['model']})")
    ax.legend()
    return save(plt, fig, path)


def save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
