"""Why continuous batching and paged KV matter, measured side by side in one run.

Three ways to serve the same synthetic workload (``benchmarks/workload.py``: varied
prompt lengths, long-tailed output lengths, greedy, ``ignore_eos``, token ids only), side by side:

* **static batching**, the way Hugging Face ``generate`` serves: take the next
  ``max_num_seqs`` requests, left-pad their prompts to the longest and prefill them,
  decode *all* of them every step until the longest is done (finished rows keep computing
  padding), only then start the next batch. It runs on a contiguous KV cache of
  max-length rows (``ContiguousKVCache`` and the engine's ``ModelRunner``, no engine);
* **continuous batching** (Orca's iteration-level scheduling, in early vLLM's form):
  ``LLMEngine`` with ``policy="prefill_first"``: a finished sequence's slot is refilled at
  the next step, but whole prompts run alone and stall the decodes;
* **continuous batching with chunked prefill** (Sarathi-Serve): ``LLMEngine`` with
  ``policy="fcfs"``: decodes first, prompt chunks fill the rest of the token budget.

The paged engines get exactly the KV memory the static batcher's contiguous cache has,
and all three the same ``max_num_seqs``. Then, at that same memory, how many sequences
fit and how much of the allocated KV holds no token (contiguous max-length rows vs paged
blocks). The three systems run again on the same prompts with heavy-tailed answer
lengths (the ``chat`` preset), and on the first workload's answers after short prompts
(the ``short`` preset), and a table gives the continuous/static ratio on each workload
beside two estimates of what a continuous batcher gains on it. Last, how decode
throughput scales with batch size on a SmolLM2-135M-shaped checkpoint (at batch 1 decode
is memory-bound, so more sequences per step come cheap until arithmetic takes over),
and where a step's time goes at each batch size.

    python benchmarks/serving.py [--model DIR] [--num-requests 128] [--arrival offline|poisson]
        [--rate R] [--max-num-seqs 32] [--max-num-batched-tokens 256] [--block-size 16]
        [--chat-output MEDIAN CAP] [--short-input MIN MAX] [--repeats 3] [--quick] [--skip-chat] [--skip-135m]
        [--backend numpy|gpu]

It prints tables, writes ``benchmarks/results/serving.json`` and ``serving_*.png``.
Latencies come from the engine's ``EventLog`` (TTFT, TPOT as in DistServe). The machine
is noisy, so read the ratios; on a busy CPU ``OPENBLAS_NUM_THREADS=1`` gives steadier numbers.

The systems are in ``serving_systems.py``, decode scaling in ``serving_scaling.py``, the
summaries, tables and plots in ``serving_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from decode import write_smollm2_shaped
from serving_report import (
    memory_report,
    plot_all,
    print_by_workload,
    print_memory,
    print_ratios,
    print_scaling,
    print_systems,
    ratios_to,
    summarize,
)
from serving_scaling import decode_scaling
from serving_systems import (
    CHUNKED,
    LABELS,
    POLICIES,
    PREFILL_FIRST,
    STATIC,
    RunResult,
    ServingSetup,
    run_engine,
    run_static,
    setup_for,
)
from workload import PRESETS, LengthDistribution, Request, Workload, chat_output_len, describe

from minibatch.config import ModelConfig
from minibatch.engine import LLMEngine
from minibatch.llm import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results"


# -------------------------------------------------------------------------------- main


VARIED, CHAT, SHORT = PRESETS["varied"], PRESETS["chat"], PRESETS["short"]
FULL = {"num_requests": 128, "input_len": (VARIED.input_len.low, VARIED.input_len.high),
        "output_len": (VARIED.output_len.low, VARIED.output_len.high),
        "chat_output": (int(CHAT.output_len.median), CHAT.output_len.high),
        "short_input": (SHORT.input_len.low, SHORT.input_len.high), "repeats": 3,
        "scaling_steps": 8, "scaling_rounds": 3, "scaling_batches": [1, 2, 4, 8, 16, 32]}
QUICK = {"num_requests": 12, "input_len": (8, 48), "output_len": (4, 96), "chat_output": (25, 96),
         "short_input": (2, 8), "repeats": 1,
         "scaling_steps": 3, "scaling_rounds": 1, "scaling_batches": [1, 2, 4, 8]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory (default: embedded)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "gpu"])
    parser.add_argument("--num-requests", type=int, help=f"default {FULL['num_requests']} ({QUICK['num_requests']} "
                        "with --quick)")
    parser.add_argument("--arrival", default="offline", choices=["offline", "poisson"])
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s for --arrival poisson")
    parser.add_argument("--input-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="own prompt tokens")
    parser.add_argument("--input-dist", default="uniform", choices=["fixed", "uniform", "lognormal"])
    parser.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="max_tokens")
    parser.add_argument("--output-dist", default="lognormal", choices=["fixed", "uniform", "lognormal"])
    parser.add_argument("--chat-output", type=int, nargs=2, metavar=("MEDIAN", "CAP"),
                        help="answer lengths of the second, heavy-tailed workload: a lognormal (sigma 1) with this "
                        f"median, cut at CAP (default {FULL['chat_output'][0]} {FULL['chat_output'][1]}, "
                        f"{QUICK['chat_output'][0]} {QUICK['chat_output'][1]} with --quick)")
    parser.add_argument("--short-input", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="prompt lengths of the third workload, the first one's answers after short prompts "
                        f"(default {FULL['short_input'][0]} {FULL['short_input'][1]})")
    parser.add_argument("--skip-chat", action="store_true",
                        help="compare on the first workload only (no chat, no short)")
    parser.add_argument("--shared-prefix-fraction", type=float, default=0.0)
    parser.add_argument("--shared-prefix-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, help=f"rounds of the three systems per workload; the median run "
                        f"counts (default {FULL['repeats']}, {QUICK['repeats']} with --quick)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds: a small workload, and "
                        "decode scaling on the served model instead of the 135M-shaped one")
    parser.add_argument("--skip-135m", action="store_true", help="skip decode scaling on the 135M-shaped model")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for serving.json and the plots")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("num_requests", "input_len", "output_len", "chat_output", "short_input", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    return args


def workload_from(args: argparse.Namespace) -> Workload:
    return Workload(num_requests=args.num_requests, arrival=args.arrival, rate=args.rate,
                    input_len=LengthDistribution(args.input_dist, *args.input_len),
                    output_len=LengthDistribution(args.output_dist, *args.output_len),
                    shared_prefix_fraction=args.shared_prefix_fraction, shared_prefix_len=args.shared_prefix_len,
                    seed=args.seed)


def chat_workload_from(args: argparse.Namespace, workload: Workload) -> Workload:
    """The first workload with heavy-tailed answers: the same prompts and arrivals (each
    aspect draws from its own stream of the seed), only the output lengths differ."""
    return replace(workload, output_len=chat_output_len(*args.chat_output))


def short_workload_from(args: argparse.Namespace, workload: Workload) -> Workload:
    """The first workload's answers after short prompts: generation dominates the work."""
    return replace(workload, input_len=LengthDistribution("uniform", *args.short_input))


def check_model(model: Path, workload: Workload, fix: str = "lower --input-len / --output-len / "
                "--shared-prefix-len") -> ModelConfig:
    """The model's config; fails with what to do when it is missing or too short."""
    if not (model / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {model} (the embedded model may not be trained yet): "
                         "pass --model DIR, e.g. --model tests/fixtures/hf/llama_gqa --quick")
    config = ModelConfig.from_dir(model)
    if workload.max_seq_len > config.max_model_len:
        raise SystemExit(f"the workload's longest prompt + output ({workload.max_seq_len} tokens) exceeds the model's "
                         f"context ({config.max_model_len}): {fix}")
    return config


def compare_systems(model: Path, backend: str, requests: list[Request], setup: ServingSetup,
                    repeats: int = 1, verbose: bool = False) -> tuple[dict[str, RunResult], list[dict[str, float]]]:
    """Static batching, continuous batching and continuous batching with chunked prefill
    on the same requests and the same KV memory, in ``repeats`` rounds of the three in
    turn (so that load from elsewhere on the machine falls on all three alike).

    Returns each system's median run by output tokens/s (what the tables and plots show)
    and every round's output tokens/s per system (how much the machine moved them).
    """
    runs: dict[str, list[RunResult]] = {name: [] for name in (STATIC, PREFILL_FIRST, CHUNKED)}
    for round_number in range(repeats):
        for name, system_runs in runs.items():
            if verbose:
                print(f"running {LABELS[name]} ({round_number + 1}/{repeats}) ...", flush=True)
            if name == STATIC:
                engine = LLMEngine(model, backend, block_size=setup.block_size, num_blocks=1)  # for its runner
                system_runs.append(run_static(engine.runner, requests, setup))
            else:
                system_runs.append(run_engine(model, backend, requests, setup, POLICIES[name], name))
    speed = {name: [summarize(run, requests)["output_tokens_per_s"] for run in system_runs]
             for name, system_runs in runs.items()}
    rounds = [{name: speed[name][i] for name in runs} for i in range(repeats)]
    median_runs = {name: system_runs[speed[name].index(statistics.median_low(speed[name]))]
                   for name, system_runs in runs.items()}
    return median_runs, rounds


def run_memory_bound(model: Path, backend: str, requests: list[Request], setup: ServingSetup) -> RunResult:
    """Chunked continuous batching in the same KV memory with no sequence limit: how many
    sequences the paged cache actually holds at once."""
    return run_engine(model, backend, requests, setup, "fcfs", "paged_memory_bound", max_num_seqs=len(requests))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workload = workload_from(args)
    config = check_model(args.model, workload)
    chat = None if args.skip_chat else chat_workload_from(args, workload)
    if chat is not None:
        check_model(args.model, chat, fix="lower --chat-output CAP or --input-len, or pass --skip-chat")
    requests = workload.generate()
    setup = setup_for(requests, args.max_num_seqs, args.max_num_batched_tokens, args.block_size)
    print(f"model {args.model} ({config.num_parameters / 1e6:.1f}M parameters), backend {args.backend}")
    print(f"workload 'varied': {json.dumps(describe(requests))}")

    results, rounds = compare_systems(args.model, args.backend, requests, setup, args.repeats, verbose=True)
    summaries = {name: summarize(result, requests) for name, result in results.items()}
    print(f"\nsetup: max_num_seqs {setup.max_num_seqs}; KV memory = {setup.max_num_seqs} contiguous rows of "
          f"{setup.row_len} = {setup.num_blocks} blocks of {setup.block_size}; token budget per step: chunked "
          f"{setup.max_num_batched_tokens}, prefill-first "
          f"{summaries[PREFILL_FIRST]['settings']['max_num_batched_tokens']} (a whole sequence must fit one step)")
    ratios = {name: ratios_to(summaries[STATIC], s) for name, s in summaries.items()}
    print("running the paged engine memory-bound (no max_num_seqs limit) ...", flush=True)
    bound = run_memory_bound(args.model, args.backend, requests, setup)
    bound_summary = summarize(bound, requests)
    memory = memory_report(setup, config, results[STATIC], results[CHUNKED], bound, requests)
    print_systems(summaries)
    print_ratios(ratios, summaries)
    print_memory(memory, bound_summary, summaries[STATIC])

    by_workload = {"varied": output_length_report(workload, requests, summaries, rounds)}
    if chat is not None:
        by_workload["chat"] = compare_on(chat, args, "chat")
        by_workload["short"] = compare_on(short_workload_from(args, workload), args, "short")
    print_by_workload(by_workload, setup.max_num_seqs)

    scaling = run_scaling(args)
    if scaling is not None:
        print_scaling(scaling)

    report = {"benchmark": "serving", "backend": args.backend, "model": str(args.model),
              "machine": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
              "threads": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "workload": describe(requests), "setup": {**vars_of(setup), "kv_slots": setup.kv_slots,
                                                        "num_blocks": setup.num_blocks},
              "systems": summaries, "ratios_to_static": ratios, "by_output_lengths": by_workload,
              "paged_memory_bound": bound_summary, "memory": memory, "decode_scaling": scaling}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "serving.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    if not args.no_plots:
        for path in plot_all(results, summaries, memory, scaling, args.out):
            print(f"wrote {path}")
    return report


def compare_on(workload: Workload, args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The three systems on a second workload, with the same settings (its own KV memory:
    contiguous rows as long as its own longest prompt + output)."""
    requests = workload.generate()
    print(f"\nworkload '{name}': {json.dumps(describe(requests))}")
    setup = setup_for(requests, args.max_num_seqs, args.max_num_batched_tokens, args.block_size)
    results, rounds = compare_systems(args.model, args.backend, requests, setup, args.repeats, verbose=True)
    return output_length_report(workload, requests, {n: summarize(r, requests) for n, r in results.items()}, rounds)


def output_length_report(workload: Workload, requests: list[Request], summaries: dict[str, dict[str, Any]],
                         rounds: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """One workload's output lengths and each system's throughput against static batching.

    ``static_rows_per_output_token`` is the rows static batching computed per token that
    was asked for: each batch runs ``B`` rows for as many steps as its longest output, so
    this is ``sum(B * longest) / sum(outputs)``, about ``E[max of B outputs] / E[output]``,
    the gain a continuous batcher that wasted no row and no step would have if prompts
    cost nothing. ``work_ratio`` counts the prompts too: every token row static batching
    computed (padding included) over each system's. ``round_ratios`` are each round's
    output tokens/s over static batching's in the same round.
    """
    outputs = np.array([r.max_tokens for r in requests])
    static_work = summaries[STATIC]["tokens_computed"]
    return {"prompt_len_mean": float(np.mean([len(r.prompt_token_ids) for r in requests])),
            "output_len": {name: getattr(workload.output_len, name) for name in workload.output_len.__slots__},
            "output_len_p50": float(np.median(outputs)), "output_len_mean": float(outputs.mean()),
            "output_len_p90": float(np.percentile(outputs, 90)), "output_len_max": int(outputs.max()),
            "static_rows_per_output_token": summaries[STATIC]["row_steps_per_output_token"],
            "work_ratio": {name: static_work / s["tokens_computed"] for name, s in summaries.items()},
            "round_ratios": {name: [r[name] / r[STATIC] for r in rounds or []] for name in summaries},
            "output_tokens_per_s": {name: s["output_tokens_per_s"] for name, s in summaries.items()},
            "ratio_to_static": {name: s["output_tokens_per_s"] / summaries[STATIC]["output_tokens_per_s"]
                                for name, s in summaries.items()},
            "cpu_ratio_to_static": {name: s["output_tokens_per_cpu_s"] / summaries[STATIC]["output_tokens_per_cpu_s"]
                                    for name, s in summaries.items()},
            "completed": all(s["completed"] for s in summaries.values())}


def run_scaling(args: argparse.Namespace) -> dict[str, Any] | None:
    """Decode scaling on a SmolLM2-135M-shaped random checkpoint (with ``--quick``: on the
    served model, a few steps, as a smoke test of the code path)."""
    preset = QUICK if args.quick else FULL
    if args.skip_135m:
        return None
    if args.quick:
        print("decode scaling (quick: on the served model) ...", flush=True)
        return decode_scaling(args.model, args.backend, preset["scaling_batches"], 16, preset["scaling_steps"],
                              preset["scaling_rounds"], gemv_size=2048, gemm_size=512)
    print("decode scaling on a SmolLM2-135M-shaped checkpoint (writing it first) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_smollm2_shaped(Path(tmp) / "smollm2-135m-shaped")
        return decode_scaling(model_dir, args.backend, preset["scaling_batches"], 16, preset["scaling_steps"],
                              preset["scaling_rounds"])


def vars_of(obj: Any) -> dict[str, Any]:
    """A slotted dataclass's fields as a dict."""
    return {name: getattr(obj, name) for name in obj.__slots__}


if __name__ == "__main__":
    main()
