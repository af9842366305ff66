"""Paged decode attention against the memory roofline, measured in one run.

In a decode step every running sequence attends with one query to all of its cached
keys and values, and nothing is shared between sequences, so attention has to read

    KV bytes = sequences x context x kv heads x head dim x 2 (K and V) x 4 (float32)

and its time is at least ``KV bytes / memory bandwidth``. This script times a backend's
``cached_attention`` on decode batches over a paged cache, for several numbers of
sequences and context lengths, and reports the bandwidth it achieved (``KV bytes /
time``) beside the memory bandwidth of a large GEMV run right after each call (the
roofline, measured in pairs as ``benchmarks/decode.py`` does, so that a change in the
machine's load moves both sides of the ratio together).

Each batch is timed twice: with every sequence's blocks scattered over the pool in a
random order (what a paged cache looks like after a while of serving) and with them in
order (a contiguous cache's layout), so the table shows what the scattered reads cost.
The NumPy reference gathers the blocks into a padded array before two batched matmuls
(``minibatch.attention.decode_attention``); the GPU kernel reads K and V through the
block table with an online softmax and never gathers. On the GPU a third timing keeps
each context in one partition (one block per query and head, no split), so the table
shows what splitting small batches' contexts over more blocks gains.

On Linux the script first asks glibc to keep freed memory for reuse
(:func:`keep_freed_memory`). By default glibc hands a freed block of more than 128 KiB
back to the kernel, and a call that allocates the same few megabytes again page-faults
them in afresh: timing one function in a loop then measures page faults (a 1.5 MB gather
took five times as long). A running engine does not see this, because glibc raises
those thresholds itself once larger arrays (the logits) have been freed.

    python benchmarks/attention.py [--backend numpy|gpu] [--block-size 16] [--quick] [--out FILE]

Heads default to SmolLM2-135M's (9 query heads, 3 KV heads, head dim 64). It prints a
table and writes ``benchmarks/results/attention_<backend>.json`` and
``attention_<backend>.png``. The machine is noisy, so read the medians and ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from decode import RESULTS, LinearProbe

from minibatch.backend import Backend, get_backend

BATCH_SIZES = (1, 8, 32, 128)
CONTEXT_LENS = (128, 512, 2048)
QUICK = {"batch_sizes": (1, 4), "context_lens": (32, 96), "repeats": 3, "gemv_size": 512}


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory (up to 1 GiB at the top of the heap) and
    to serve arrays of up to 32 MiB from the heap, so that a freed temporary is reused
    without page faults. Returns whether it could (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def kv_bytes(num_seqs: int, context_len: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of float32 keys and values a decode step's attention must read."""
    return num_seqs * context_len * num_kv_heads * head_dim * 2 * 4


def decode_case(ops: Backend, num_seqs: int, context_len: int, block_size: int, heads: tuple[int, int, int],
                scattered: bool, seed: int = 0) -> dict[str, Any]:
    """The arguments of one decode ``cached_attention`` call on ``ops``: random K/V pools
    exactly big enough, one query per sequence, each sequence ``context_len`` tokens long;
    block tables a random permutation of the pool (``scattered``) or in order."""
    num_heads, num_kv_heads, head_dim = heads
    rng = np.random.default_rng(seed)
    blocks_per_seq = -(-context_len // block_size)
    num_blocks = num_seqs * blocks_per_seq
    order = rng.permutation(num_blocks) if scattered else np.arange(num_blocks)
    pool_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return {"q": ops.asarray(rng.standard_normal((num_seqs, num_heads, head_dim), dtype=np.float32)),
            "k_cache": ops.asarray(rng.standard_normal(pool_shape, dtype=np.float32)),
            "v_cache": ops.asarray(rng.standard_normal(pool_shape, dtype=np.float32)),
            "block_tables": ops.asarray(order.reshape(num_seqs, blocks_per_seq).astype(np.int32)),
            "query_start_loc": np.arange(num_seqs + 1, dtype=np.int64),
            "context_lens": np.full(num_seqs, context_len, dtype=np.int64),
            "scale": head_dim ** -0.5}


def time_pairs(ops: Backend, case: dict[str, Any], probe: LinearProbe, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` attention calls, each followed by one probe GEMV (also timed);
    one untimed warm-up call first."""
    ops.cached_attention(**case)
    attention, gemv = [], []
    for _ in range(repeats):
        ops.synchronize()
        start = time.perf_counter()
        ops.cached_attention(**case)
        ops.synchronize()
        attention.append(time.perf_counter() - start)
        gemv.append(probe.seconds())
    return attention, gemv


def measure(backend: str, batch_sizes: tuple[int, ...], context_lens: tuple[int, ...], block_size: int,
            heads: tuple[int, int, int], repeats: int, gemv_size: int) -> list[dict[str, Any]]:
    """One row per (sequences, context): achieved bandwidth and its fraction of the paired
    GEMV's, for scattered and in-order block tables."""
    ops = get_backend(backend)
    probe = LinearProbe(backend, 1, gemv_size, gemv_size)
    for _ in range(2):
        probe.seconds()  # warm-up
    rows = []
    for num_seqs in batch_sizes:
        for context_len in context_lens:
            needed = kv_bytes(num_seqs, context_len, heads[1], heads[2])
            row: dict[str, Any] = {"num_seqs": num_seqs, "context_len": context_len, "kv_bytes": needed}
            for layout, scattered, options in variants(backend, context_len):
                case = decode_case(ops, num_seqs, context_len, block_size, heads, scattered) | options
                attention, gemv = time_pairs(ops, case, probe, repeats)
                fractions = [needed * g / (probe.weight_bytes * a) for a, g in zip(attention, gemv, strict=True)]
                seconds = statistics.median(attention)
                row[layout] = {"seconds": seconds, "bytes_per_s": needed / seconds,
                               "roofline_bytes_per_s": probe.weight_bytes / statistics.median(gemv),
                               "fraction_of_roofline": statistics.median(fractions)}
                del case
            row["scattered_over_in_order"] = row["scattered"]["seconds"] / row["in_order"]["seconds"]
            if "one_partition" in row:
                row["one_partition_over_split"] = row["one_partition"]["seconds"] / row["scattered"]["seconds"]
            rows.append(row)
            print(f"  {num_seqs:>4} seqs x {context_len:>5} tokens: {row['scattered']['seconds'] * 1e3:8.3f} ms, "
                  f"{row['scattered']['fraction_of_roofline']:.0%} of the roofline", flush=True)
    return rows


def variants(backend: str, context_len: int) -> list[tuple[str, bool, dict[str, Any]]]:
    """What to time per batch: (name, scattered block tables?, extra arguments). The GPU
    kernel also runs with each context in one partition, against its own choice."""
    timed = [("scattered", True, {}), ("in_order", False, {})]
    if backend == "gpu":
        timed.append(("one_partition", True, {"partition_size": context_len}))
    return timed


def print_table(rows: list[dict[str, Any]]) -> None:
    split = "one_partition" in rows[0]
    print(f"\n{'seqs':>5}{'context':>9}{'KV MB':>9}{'ms':>10}{'GB/s':>8}{'roofline':>10}{'of roof':>9}"
          f"{'in order ms':>13}{'of roof':>9}{'scattered/in order':>20}" + (f"{'1 part/split':>14}" if split else ""))
    print("-" * (116 if split else 102))
    for r in rows:
        s, o = r["scattered"], r["in_order"]
        print(f"{r['num_seqs']:>5}{r['context_len']:>9}{r['kv_bytes'] / 1e6:>9.1f}{s['seconds'] * 1e3:>10.3f}"
              f"{s['bytes_per_s'] / 1e9:>8.1f}{s['roofline_bytes_per_s'] / 1e9:>10.1f}{s['fraction_of_roofline']:>9.0%}"
              f"{o['seconds'] * 1e3:>13.3f}{o['fraction_of_roofline']:>9.0%}{r['scattered_over_in_order']:>19.2f}x"
              + (f"{r['one_partition_over_split']:>13.2f}x" if split else ""))
    print("(decode attention, one query per sequence; KV MB = keys and values it must read;\n"
          " GB/s = KV bytes / time; roofline = bandwidth of a large GEMV run right after each call;\n"
          " of roof = median over calls of the pair's ratio; scattered = block tables a random permutation\n"
          " of the pool, in order = each sequence's blocks in a row"
          + (";\n 1 part/split = time with each context in one partition over the time with the kernel's own)"
             if split else ")"))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Achieved bandwidth against KV bytes, one line per context length and layout (and, on
    the GPU, without the split), with the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, context_len in enumerate(sorted({r["context_len"] for r in rows})):
        mine = [r for r in rows if r["context_len"] == context_len]
        x = [r["kv_bytes"] / 1e6 for r in mine]
        ax.plot(x, [r["scattered"]["bytes_per_s"] / 1e9 for r in mine], "o-", color=f"C{index}",
                label=f"context {context_len}, scattered blocks")
        ax.plot(x, [r["in_order"]["bytes_per_s"] / 1e9 for r in mine], "x:", color=f"C{index}",
                label=f"context {context_len}, in order")
        if "one_partition" in mine[0]:  # GPU: the same calls without splitting contexts
            ax.plot(x, [r["one_partition"]["bytes_per_s"] / 1e9 for r in mine], "s--", color=f"C{index}",
                    markersize=3, label=f"context {context_len}, one partition")
    roofline = statistics.median(r["scattered"]["roofline_bytes_per_s"] for r in rows) / 1e9
    ax.axhline(roofline, color="black", linestyle="--", label=f"memory roofline (GEMV), {roofline:.0f} GB/s")
    ax.set(xscale="log", xlabel="KV bytes read per call (MB; more sequences to the right)",
           ylabel="achieved GB/s", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy", choices=["numpy", "gpu"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, nargs=3, default=(9, 3, 64), metavar=("HQ", "HKV", "D"),
                        help="query heads, kv heads, head dim (default SmolLM2-135M's: 9 3 64)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per case (median taken)")
    parser.add_argument("--gemv-size", type=int, default=8192, help="rows and columns of the bandwidth GEMV")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/attention_<backend>.json)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else {"batch_sizes": BATCH_SIZES, "context_lens": CONTEXT_LENS,
                                      "repeats": args.repeats, "gemv_size": args.gemv_size}
    heads = tuple(args.heads)
    if heads[0] % heads[1]:
        parser.error(f"--heads: {heads[0]} query heads are not a multiple of {heads[1]} kv heads")
    kept = keep_freed_memory()
    print(f"decode attention on the {args.backend} backend, heads {heads}, block size {args.block_size}; "
          f"freed memory {'kept for reuse' if kept else 'returned as the allocator decides'}", flush=True)
    rows = measure(args.backend, sizes["batch_sizes"], sizes["context_lens"], args.block_size, heads,
                   sizes["repeats"], sizes["gemv_size"])
    print_table(rows)
    report = {"benchmark": "attention", "backend": args.backend, "machine": platform.platform(),
              "processor": platform.processor(), "block_size": args.block_size,
              "heads": {"num_heads": heads[0], "num_kv_heads": heads[1], "head_dim": heads[2]},
              "repeats": sizes["repeats"], "gemv_size": sizes["gemv_size"], "freed_memory_kept": kept,
              "rows": rows}
    out = args.out or RESULTS / f"attention_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.no_plot:
        png = out.with_suffix(".png")
        plot(rows, png, f"decode attention, {args.backend} backend")
        print(f"wrote {png}")
    return report


if __name__ == "__main__":
    main()
