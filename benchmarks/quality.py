"""What each quantization scheme costs in accuracy and saves in memory, measured in one run.

Every weight format of :mod:`minibatch.quant` (and float16/bfloat16 rounding, and the
int8 and KIVI 2-bit KV caches) scores the same held-out windows as the float32 model it came from:

* **bits per byte**: the mean of ``-log2 p(next byte)`` over every position of the windows
  (the shipped models are byte-level, so a token is a byte); its relative change from
  float32 is the headline number;
* **KL from f32**: the mean over positions of ``KL(p_f32 || p_scheme)`` in nats, how far each
  next-token distribution moved, even where the byte that came happens to score the same;
* **greedy agreement**: how often the most likely next token is the one float32 picks.

The float32 baseline is measured in the same run. KV-cache rows store K and V as int8
(one scale per token and head) or as KIVI's 2 bits (:mod:`minibatch.kivi`): the windows
are prefilled through a paged cache, so every attention reads the quantized K/V back
(KIVI: every block before the query's own). A second table counts how many sequences fit
in a fixed KV-cache budget with float32, int8 and 2-bit KV, computed from the bytes per
block (and, for KIVI, one float residual row per sequence) and checked by building an
``LLMEngine`` with that budget.

A scheme's group size must divide the input dimension of every projection it stores.
When it does not divide the MLP width (a 688-wide MLP, say, is not a multiple of 32),
``--fit pad`` (the default) widens the MLP with zero units to the next multiple:
the extra gate/up rows are zero, so their units output ``silu(0) * 0 = 0``, and the extra
down_proj columns multiply those zeros. The float model computes exactly the same
function, and every projection is then stored in the scheme (rows marked ``+``).
``--fit int8`` instead stores the projections the scheme cannot hold as int8, as
llama.cpp falls back to another type (rows marked ``*``); ``--fit none`` leaves such
schemes out. Bits per weight count the stored bytes against the model's real weights.

    python benchmarks/quality.py [--model DIR] [--windows 16] [--window-len 512] [--source sample|corpus]
                                 [--fit pad|int8|none]

It prints the tables and writes ``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from quality_formats import storage, weights_in_format

from minibatch.backend import get_backend
from minibatch.checkpoint import load_weights
from minibatch.config import ModelConfig
from minibatch.engine import LLMEngine
from minibatch.kv_cache import kivi_residual_bytes, kv_bytes_per_block, kv_bytes_per_token
from minibatch.llm import DEFAULT_MODEL, MODELS_DIR
from minibatch.model import ForwardBatch, ModelRunner
from minibatch.quant import PROJECTIONS

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
HELDOUT_SAMPLE = MODELS_DIR / "heldout_sample.txt"

WEIGHT_FORMATS = ("f32", "f16", "bf16", "int8", "int4-g32", "int4-g128", "q8_0", "q4_0")
KV_ROWS = (("f32", "int8"), ("f32", "kivi2"), ("q4_0", "int8"))  # (weights, KV cache) pairs beyond float32 KV
KV_DTYPES = ("float32", "int8", "kivi2")
# The goals the quantization work is held to: |relative change of bits per byte| at most this.
BPB_GOALS = {("int8", "float32"): 0.005, ("q8_0", "float32"): 0.005, ("int4-g32", "float32"): 0.05,
             ("q4_0", "float32"): 0.05, ("f32", "int8"): 0.005, ("f32", "kivi2"): 0.05}
Q4_0_BITS_PER_WEIGHT = 4.5

# ------------------------------------------------------------------------ the metrics


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``[T, V]`` logits -> natural-log probabilities, in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # [T, V]
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # [T, V]


def bits_per_byte(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean of ``-log2 p(target)``: ``[T, V]`` logits and ``[T]`` next tokens (byte-level,
    so bits per token is bits per byte). Uniform logits give ``log2(V)``."""
    log_probs = log_softmax(logits)  # [T, V]
    return float(-log_probs[np.arange(len(targets)), targets].mean() / math.log(2))


def mean_kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of ``KL(p_ref || p)`` in nats: ``[T, V], [T, V] -> float``, >= 0,
    and 0 exactly when the two distributions are equal."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(logits)  # [T, V] each
    return float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())


def greedy_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of positions whose argmax token is the same: ``[T, V], [T, V] -> [0, 1]``."""
    return float(np.mean(np.argmax(reference_logits, axis=-1) == np.argmax(logits, axis=-1)))


# ------------------------------------------------------------------- held-out windows


def heldout_bytes(source: str) -> tuple[np.ndarray, str]:
    """The held-out text as token ids, and a sentence saying where it came from.

    ``"sample"``: ``minibatch/models/heldout_sample.txt`` (whole held-out files of the
    training corpus, shipped with the models); ``"corpus"``: the held-out split of the
    CPython standard library of this interpreter (``tools/stdlib_corpus.py``), BOS/EOS included.
    """
    if source == "sample":
        if not HELDOUT_SAMPLE.is_file():
            raise FileNotFoundError(f"{HELDOUT_SAMPLE} is missing: it ships with the trained models; "
                                    "use --source corpus to read the held-out split from the stdlib instead")
        data = np.frombuffer(HELDOUT_SAMPLE.read_bytes(), dtype=np.uint8).astype(np.int64)
        return data, f"{HELDOUT_SAMPLE.relative_to(MODELS_DIR.parents[1])} ({len(data):,} bytes)"
    if source == "corpus":
        sys.path.insert(0, str(Path(__file__).parents[1]))
        from tools.stdlib_corpus import load_corpus

        split = load_corpus()
        return split.heldout.astype(np.int64), (f"held-out split of the CPython {split.metadata['python_version']} "
                                                f"stdlib ({split.metadata['n_files_heldout']} files)")
    raise ValueError(f"unknown source {source!r}: choose 'sample' or 'corpus'")


def heldout_windows(tokens: np.ndarray, num_windows: int, window_len: int) -> list[np.ndarray]:
    """``num_windows`` windows of ``window_len`` tokens, evenly spaced over ``tokens``
    (the same windows every time). Raises ``ValueError`` if the text is too short."""
    if len(tokens) < window_len:
        raise ValueError(f"the held-out text has {len(tokens)} tokens, fewer than one window of {window_len}")
    starts = np.linspace(0, len(tokens) - window_len, num_windows).astype(np.int64)
    return [tokens[start:start + window_len] for start in starts]


# -------------------------------------------------------------------- scoring windows


def score_windows(runner: ModelRunner, windows: list[np.ndarray], block_size: int = 16,
                  windows_per_batch: int = 4) -> list[np.ndarray]:
    """Next-token logits ``[T, V]`` at every position of every window.

    Each group of windows is one flat prefill batch over fresh paged KV storage of the
    runner's dtype (block tables of ``block_size`` slots), so a quantized cache stores
    each token's K/V on the way in and attention reads them back from it.
    """
    logits = []
    for first in range(0, len(windows), windows_per_batch):
        group = windows[first:first + windows_per_batch]
        blocks = [-(-len(window) // block_size) for window in group]
        kv = runner.new_kv(sum(blocks), block_size, num_residual_rows=len(group))
        entries, next_block = [], 0
        for window, num_blocks in zip(group, blocks, strict=True):
            table = np.arange(next_block, next_block + num_blocks)
            next_block += num_blocks
            positions = np.arange(len(window))
            slots = table[positions // block_size] * block_size + positions % block_size
            entries.append(([int(t) for t in window], 0, table.tolist(), slots))
        out = runner.run(ForwardBatch.build(entries, logits="all"), kv)  # [sum T, V]
        logits += np.split(out, np.cumsum([len(w) for w in group])[:-1])
    return logits


def compare(reference: list[np.ndarray], logits: list[np.ndarray], windows: list[np.ndarray],
            vocab_bytes: int = 256) -> dict:
    """The metrics over every scored position of every window: position ``t`` predicts
    token ``t+1``; only byte targets (ids below ``vocab_bytes``) are scored."""
    rows = [(ref[:-1][w[1:] < vocab_bytes], out[:-1][w[1:] < vocab_bytes], w[1:][w[1:] < vocab_bytes])
            for ref, out, w in zip(reference, logits, windows, strict=True)]
    ref_all = np.concatenate([r for r, _, _ in rows])
    out_all = np.concatenate([o for _, o, _ in rows])
    targets = np.concatenate([t for _, _, t in rows])
    return {"bits_per_byte": bits_per_byte(out_all, targets), "kl_from_f32": mean_kl_divergence(ref_all, out_all),
            "greedy_agreement": greedy_agreement(ref_all, out_all), "scored_positions": len(targets)}


def evaluate(model_dir: Path, windows: list[np.ndarray], fit: str = "pad", backend: str = "numpy",
             formats: tuple[str, ...] = WEIGHT_FORMATS, kv_rows: tuple = KV_ROWS) -> list[dict]:
    """One row per (weight format, KV cache dtype), float32 weights and KV first."""
    config = ModelConfig.from_dir(model_dir)
    weights = load_weights(model_dir, config)
    num_weights = sum(int(np.prod(getattr(layer, name).shape)) for layer in weights.layers for name in PROJECTIONS)
    ops = get_backend(backend)
    runs = [(fmt, "float32") for fmt in formats] + list(kv_rows)
    rows, reference = [], None
    for fmt, kv_dtype in runs:
        try:
            formatted, notes = weights_in_format(weights, fmt, fit)
        except ValueError as error:  # --fit none: the scheme cannot store some projection
            rows.append({"weights": fmt, "kv_cache": kv_dtype, "error": str(error)})
            continue
        start = time.perf_counter()
        logits = score_windows(ModelRunner(config, formatted, ops, kv_dtype), windows)
        row = {"weights": fmt, "kv_cache": kv_dtype, **storage(formatted, fmt, num_weights),
               "kv_bytes_per_token": kv_bytes_per_token(config, kv_dtype, 16), **notes}
        reference = logits if reference is None else reference
        row.update(compare(reference, logits, windows), seconds=time.perf_counter() - start)
        rows.append(row)
    baseline = rows[0]["bits_per_byte"]
    for row in rows:
        if "bits_per_byte" in row:
            row["bpb_relative_change"] = row["bits_per_byte"] / baseline - 1
    return rows


def check_goals(rows: list[dict]) -> list[dict]:
    """The goals as rows: what was asked, what was measured, PASS or FAIL (or n/a)."""
    by_key = {(row["weights"], row["kv_cache"]): row for row in rows}
    goals = []
    for (fmt, kv_dtype), limit in BPB_GOALS.items():
        row = by_key.get((fmt, kv_dtype), {})
        name = fmt if kv_dtype == "float32" else f"{kv_dtype} KV cache"
        goal = {"goal": f"{name}: bits per byte within {limit:.1%} of f32"}
        if "bpb_relative_change" in row:
            change = row["bpb_relative_change"]
            note = f" ({fit_note(row)})" if fit_note(row) else ""
            goal.update(measured=f"{change:+.2%}{note}", passed=abs(change) <= limit)
        else:
            goal.update(measured="not measured", passed=None)
        goals.append(goal)
    row = by_key.get(("q4_0", "float32"), {})
    bits = row.get("bits_per_weight_of_scheme_tensors")
    goal = {"goal": f"q4_0 stores {Q4_0_BITS_PER_WEIGHT} bits per weight"}
    if bits is None:
        goal.update(measured="not measured", passed=None)
    else:
        overall = f" (model: {row['bits_per_weight']:.3f})" if row["bits_per_weight"] != bits else ""
        goal.update(measured=f"{bits:.3f}{overall}", passed=bits == Q4_0_BITS_PER_WEIGHT)
    return goals + [goal]


# ------------------------------------------------------------------ KV-cache capacity


def kv_capacity(config: ModelConfig, budget_bytes: int, seq_len: int, block_size: int, kv_cache_dtype: str) -> dict:
    """Sequences of ``seq_len`` tokens a ``budget_bytes`` KV cache holds, on paper. Each
    sequence needs its blocks and, in a KIVI cache, one float32 residual row."""
    per_block = kv_bytes_per_block(config, kv_cache_dtype, block_size)
    blocks_per_seq = -(-seq_len // block_size)
    residual = kivi_residual_bytes(config, block_size) if kv_cache_dtype == "kivi2" else 0
    max_sequences = budget_bytes // (blocks_per_seq * per_block + residual)
    return {"kv_cache": kv_cache_dtype, "bytes_per_token": per_block / block_size,
            "bytes_per_sequence": blocks_per_seq * per_block + residual, "blocks_per_sequence": blocks_per_seq,
            "num_blocks": (budget_bytes - max_sequences * residual) // per_block,  # after the residual rows
            "max_sequences": max_sequences}


def engine_capacity(model_dir: Path, budget_bytes: int, block_size: int, kv_cache_dtype: str, seqs: int,
                    seq_len: int) -> int:
    """How many ``seq_len``-token sequences an ``LLMEngine`` given ``budget_bytes`` of KV
    cache and ``max_num_seqs=seqs`` can hold at once, from the blocks it allocated (a KIVI
    engine first sets aside a residual row per sequence)."""
    engine = LLMEngine(model_dir, kv_cache_memory=budget_bytes, block_size=block_size,
                       kv_cache_dtype=kv_cache_dtype, max_num_seqs=seqs)
    assert engine.runner.kv.num_bytes <= budget_bytes, "the engine's pools exceed its budget"
    return min(seqs, engine.cache.num_blocks // -(-seq_len // block_size))


def capacity_rows(name: str, model_dir: Path, budget_bytes: int, seq_len: int, block_size: int) -> list[dict]:
    config = ModelConfig.from_dir(model_dir)
    rows = []
    for kv_dtype in KV_DTYPES:
        row = {"model": name, **kv_capacity(config, budget_bytes, seq_len, block_size, kv_dtype)}
        row["engine_max_sequences"] = engine_capacity(model_dir, budget_bytes, block_size, kv_dtype,
                                                      row["max_sequences"], seq_len)
        rows.append(row)
    for row in rows:
        row["sequences_vs_float32"] = row["max_sequences"] / rows[0]["max_sequences"]
        row["tokens_vs_float32"] = row["num_blocks"] / rows[0]["num_blocks"]
    return rows


# ------------------------------------------------------------------------ the report


def fit_note(row: dict) -> str:
    """How a row's weights were made to fit the scheme, in a few words ("" when nothing was needed)."""
    notes = []
    if "padded_mlp" in row:
        notes.append(f"MLP padded {row['padded_mlp'][0]}->{row['padded_mlp'][1]}")
    if "fallback" in row:
        notes.append(f"{', '.join(row['fallback']['projections'])} {row['fallback']['scheme']}")
    return "; ".join(notes)


def format_row_name(row: dict) -> str:
    name = row["weights"] if row["kv_cache"] == "float32" else f"{row['weights']} + {row['kv_cache']} KV"
    return name + ("+" if "padded_mlp" in row else "") + ("*" if "fallback" in row else "")


def print_quality_table(rows: list[dict]) -> None:
    header = (f"{'scheme':<18}{'bits/w':>8}{'model MiB':>11}{'KV B/tok':>10}{'bits/byte':>11}{'vs f32':>9}"
              f"{'KL (nats)':>11}{'greedy agree':>14}")
    print(header + "\n" + "-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{format_row_name(row):<18}  cannot store: {row['error']}")
            continue
        print(f"{format_row_name(row):<18}{row['bits_per_weight']:>8.3f}{row['model_bytes'] / 2**20:>11.2f}"
              f"{row['kv_bytes_per_token']:>10,.0f}{row['bits_per_byte']:>11.4f}{row['bpb_relative_change']:>+9.2%}"
              f"{row['kl_from_f32']:>11.2e}{row['greedy_agreement']:>14.2%}")
    for row in rows:
        if "padded_mlp" in row or "fallback" in row:
            print(f"{format_row_name(row)}: {fit_note(row)}")
    if any("padded_mlp" in row for row in rows):
        print("+ padded with zero units: the same function in float32, every projection in the scheme")
    if any("fallback" in row for row in rows):
        print("* the scheme's group size does not divide these projections' inputs: stored as int8")


def print_goals(goals: list[dict]) -> None:
    width = max(len(g["goal"]) for g in goals)
    measured = max(len("measured"), *(len(g["measured"]) for g in goals)) + 2
    print(f"\n{'goal':<{width}}  {'measured':<{measured}}result")
    for g in goals:
        result = "n/a" if g["passed"] is None else ("PASS" if g["passed"] else "FAIL")
        print(f"{g['goal']:<{width}}  {g['measured']:<{measured}}{result}")


def print_capacity(rows: list[dict], budget_bytes: int, seq_len: int, block_size: int) -> None:
    print(f"\nsequences of {seq_len} tokens in a {budget_bytes / 2**20:g} MiB KV cache (blocks of {block_size} "
          "tokens; KIVI also keeps one float block per sequence; 'engine': the sequences an LLMEngine "
          "with that budget holds)")
    header = (f"{'model':<22}{'KV':>7}{'B/token':>9}{'KiB/seq':>9}{'max seqs':>10}{'engine':>8}"
              f"{'seqs x f32':>12}{'tokens x f32':>14}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['model']:<22}{r['kv_cache']:>7}{r['bytes_per_token']:>9,.0f}{r['bytes_per_sequence'] / 1024:>9,.0f}"
              f"{r['max_sequences']:>10,}{r['engine_max_sequences']:>8,}{r['sequences_vs_float32']:>12.2f}"
              f"{r['tokens_vs_float32']:>14.2f}")


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (default: tiny-target)")
    parser.add_argument("--source", default="sample", choices=["sample", "corpus"], help="held-out text")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows (same for every scheme)")
    parser.add_argument("--window-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--fit", default="pad", choices=["pad", "int8", "none"],
                        help="when a group size does not divide the MLP width: pad the MLP with zero units, "
                             "store those projections as int8, or skip the scheme")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "gpu"])
    parser.add_argument("--kv-budget-mib", type=float, default=64, help="KV-cache budget for the capacity table")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence in the capacity table")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--skip-135m", action="store_true", help="capacity table without the SmolLM2-135M shape")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args()

    config = ModelConfig.from_dir(args.model)
    tokens, source = heldout_bytes(args.source)
    window_len = min(args.window_len, config.max_model_len)
    windows = heldout_windows(tokens, args.windows, window_len)
    print(f"model: {shown(args.model)}\nheld-out text: {source}; {len(windows)} evenly spaced windows of {window_len} "
          "tokens, the same for every scheme\n")
    rows = evaluate(args.model, windows, args.fit, args.backend)
    print_quality_table(rows)
    goals = check_goals(rows)
    print_goals(goals)

    budget = int(args.kv_budget_mib * 2**20)
    capacity = capacity_rows(args.model.name, args.model, budget, args.seq_len, args.block_size)
    if not args.skip_135m:
        from decode import write_smollm2_shaped

        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_smollm2_shaped(Path(tmp) / "smollm2-135m-shaped")
            capacity += capacity_rows("SmolLM2-135M-shaped", model_dir, budget, args.seq_len, args.block_size)
    print_capacity(capacity, budget, args.seq_len, args.block_size)

    report = {"benchmark": "quality", "model": shown(args.model), "heldout": source, "windows": len(windows),
              "window_len": window_len, "scored_positions": rows[0].get("scored_positions"),
              "kl_units": "nats", "machine": platform.platform(),
              "args": {k: shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "rows": rows, "goals": goals,
              "kv_capacity": {"budget_bytes": budget, "seq_len": args.seq_len, "block_size": args.block_size,
                              "rows": capacity}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
