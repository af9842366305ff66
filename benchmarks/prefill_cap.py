"""Short prompts behind long ones: what capping a prompt's chunk does to time to first token.

With chunked prefill and no cap, the oldest prompt takes all the token budget it can
use, so a short prompt that arrives behind a long one waits out the long one's chunks.
``long_prefill_token_threshold`` (vLLM's setting of that name) caps the prompt tokens one
sequence computes per step, so the budget is shared and the short prompt starts at once.
This measures the trade on a Poisson stream where one request in five has a long prompt:
the short prompts' TTFT against the long ones', with TPOT and throughput beside them.

Every cap serves the same requests on a fresh chunked-prefill engine (``policy="fcfs"``),
the caps taking turns for ``--repeats`` rounds so that load from elsewhere on the machine
falls on all of them alike; each figure is the median over the rounds, and each ratio is
to the uncapped run of the same round. ``largest_prompt_chunk`` is the most prompt
tokens any sequence computed in one step: the cap at work.

    python benchmarks/prefill_cap.py [--rate 15] [--num-requests 96] [--caps 0 32 64 128] [--repeats 5]
        [--long-fraction 0.2] [--long-input 600 800] [--short-input 16 48] [--output-len 16 128]
        [--model DIR] [--quick]

It prints a table and writes ``benchmarks/results/prefill_cap.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from serving_report import summarize
from serving_systems import replay
from workload import Request, random_tokens

from minibatch.engine import LLMEngine
from minibatch.llm import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory (default: embedded)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "gpu"])
    parser.add_argument("--rate", type=float, default=15.0, help="requests per second (Poisson)")
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--long-fraction", type=float, default=0.2, help="share of requests with a long prompt")
    parser.add_argument("--long-input", type=int, nargs=2, default=[600, 800], metavar=("MIN", "MAX"))
    parser.add_argument("--short-input", type=int, nargs=2, default=[16, 48], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--caps", type=int, nargs="+", default=[0, 32, 64, 128],
                        help="values of long_prefill_token_threshold; 0 (no cap) is the baseline")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12 requests, one round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if 0 not in args.caps:
        args.caps = [0, *args.caps]  # the baseline every ratio is to
    if args.quick:
        args.num_requests, args.repeats = 12, 1
    return args


def mixed_requests(args: argparse.Namespace) -> list[Request]:
    """Poisson arrivals; ``round(long_fraction * num_requests)`` requests, at random
    places in the stream, have a long prompt (their ids start with ``long``), the others a
    short one; lengths uniform in their ranges."""
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1 / args.rate, args.num_requests))
    long = set(rng.choice(args.num_requests, round(args.long_fraction * args.num_requests), replace=False).tolist())
    requests = []
    for i, arrival in enumerate(arrivals):
        kind = "long" if i in long else "short"
        low, high = args.long_input if kind == "long" else args.short_input
        prompt = random_tokens(rng, int(rng.integers(low, high, endpoint=True)))
        requests.append(Request(f"{kind}-{i:03d}", prompt, int(rng.integers(*args.output_len, endpoint=True)),
                                float(arrival)))
    return requests


def run_cap(args: argparse.Namespace, requests: list[Request], cap: int) -> dict[str, float]:
    """One run with ``long_prefill_token_threshold=cap``: the short and the long prompts'
    TTFT percentiles, TPOT and throughput (from the serving benchmark's summary) and the
    largest prompt chunk any step computed."""
    engine = LLMEngine(args.model, args.backend, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, long_prefill_token_threshold=cap)
    result = replay(engine, requests, f"cap {cap}")
    summary = summarize(result, requests)
    if not summary["completed"]:
        raise RuntimeError(f"cap {cap}: a request did not get all its max_tokens")
    ttft = {kind: [result.log.requests[r.request_id].ttft for r in requests if r.request_id.startswith(kind)]
            for kind in ("short", "long")}
    row = {f"{kind}_ttft_p{q}_s": float(np.percentile(times, q)) if times else float("nan")
           for kind, times in ttft.items() for q in (50, 90)}
    row.update({key: summary[key] for key in ("tpot_p50_s", "tpot_p99_s", "output_tokens_per_s")})
    row["largest_prompt_chunk"] = max((tokens for step in result.log.steps for _, _, tokens in step.scheduled
                                       if tokens > 1), default=0)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    requests = mixed_requests(args)
    num_long = sum(r.request_id.startswith("long") for r in requests)
    print(f"{len(requests)} requests at {args.rate}/s: {num_long} long prompts ({args.long_input[0]}.."
          f"{args.long_input[1]} tokens), {len(requests) - num_long} short ({args.short_input[0]}.."
          f"{args.short_input[1]}); budget {args.max_num_batched_tokens}, max_num_seqs {args.max_num_seqs}")
    rounds: list[dict[int, dict[str, float]]] = []
    for round_number in range(args.repeats):
        rounds.append({cap: run_cap(args, requests, cap) for cap in args.caps})
        print(f"round {round_number + 1}/{args.repeats} done", flush=True)
    rows = []
    for cap in args.caps:
        row = {"cap": cap}
        for key in rounds[0][cap]:
            row[key] = statistics.median(r[cap][key] for r in rounds)
            if key != "largest_prompt_chunk":
                row[f"{key}_vs_uncapped"] = statistics.median(r[cap][key] / r[0][key] for r in rounds)
        rows.append(row)
    print_table(rows)
    report = {"benchmark": "prefill_cap", "args": {k: str(v) if isinstance(v, Path) else v
                                                   for k, v in vars(args).items()},
              "num_long": num_long, "rounds": [{str(cap): row for cap, row in r.items()} for r in rounds],
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "prefill_cap.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def print_table(rows: list[dict[str, float]]) -> None:
    header = (f"{'cap':>5} {'short TTFT p50':>15} {'p90':>7} {'long TTFT p50':>14} {'p90':>7} {'TPOT p50':>9} "
              f"{'p99':>7} {'out tok/s':>10} {'largest chunk':>14}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        ms = {key: row[key] * 1e3 for key in row if key.endswith("_s")}
        print(f"{row['cap'] or 'none':>5} {ms['short_ttft_p50_s']:12.0f} ms {ms['short_ttft_p90_s']:7.0f} "
              f"{ms['long_ttft_p50_s']:11.0f} ms {ms['long_ttft_p90_s']:7.0f} {ms['tpot_p50_s']:6.1f} ms "
              f"{ms['tpot_p99_s']:7.1f} {row['output_tokens_per_s']:10.0f} {row['largest_prompt_chunk']:14.0f}")
    print("(medians over the rounds; the JSON also has each figure over the uncapped run's, per round)")


if __name__ == "__main__":
    main()
