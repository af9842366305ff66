"""Properties of the NumPy layers and of cached attention (the specification itself)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minibatch.attention import cached_attention, causal_attention, write_kv
from minibatch.layers import apply_rope, linear, rms_norm, rope_cos_sin


@given(st.integers(1, 8), st.integers(1, 64), st.integers(0, 2**31))
def test_rms_norm_gives_unit_rms(n, hidden, seed):
    x = np.random.default_rng(seed).standard_normal((n, hidden)).astype(np.float32) * 5
    out = rms_norm(x, np.ones(hidden, np.float32), 1e-12)
    np.testing.assert_allclose(np.sqrt(np.mean(out**2, axis=-1)), 1.0, rtol=1e-4)


@given(st.integers(0, 2000), st.integers(0, 2000), st.integers(0, 2**31))
def test_rope_scores_depend_only_on_relative_position(p, shift, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 16))
    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)

    def score(qp, kp):
        rq = apply_rope(q.astype(np.float32), *rope_cos_sin(np.array([qp]), inv_freq))
        rk = apply_rope(k.astype(np.float32), *rope_cos_sin(np.array([kp]), inv_freq))
        return float(np.sum(rq * rk))

    assert abs(score(p + 7, p) - score(shift + 7, shift)) < 1e-3
    rotated = apply_rope(q.astype(np.float32), *rope_cos_sin(np.array([p]), inv_freq))
    assert abs(np.linalg.norm(rotated) - np.linalg.norm(q)) < 1e-4


def naive_attention(q, k, v, scale):
    """Loop-by-loop reference: every query head, every allowed key."""
    t, hq, _ = q.shape
    s, hkv, _ = k.shape
    out = np.zeros_like(q)
    for i in range(t):
        for h in range(hq):
            kv = h // (hq // hkv)
            visible = s - t + i + 1
            scores = np.array([q[i, h] @ k[j, kv] * scale for j in range(visible)])
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[i, h] = weights @ v[:visible, kv]
    return out


@given(st.integers(1, 6), st.integers(0, 6), st.sampled_from([(1, 1), (4, 2), (4, 1), (6, 3)]),
       st.integers(0, 2**31))
def test_causal_attention_matches_the_loop_definition(t, extra, heads, seed):
    rng = np.random.default_rng(seed)
    hq, hkv = heads
    q = rng.standard_normal((t, hq, 8))
    k, v = rng.standard_normal((2, t + extra, hkv, 8))
    np.testing.assert_allclose(causal_attention(q, k, v, 0.3), naive_attention(q, k, v, 0.3), rtol=1e-6, atol=1e-9)


@st.composite
def paged_batches(draw):
    """A random ragged batch over a shuffled paged cache: (q, k_cache, v_cache, metadata, per-seq k/v)."""
    block_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    hkv, group = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    lengths = draw(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12)), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    blocks_needed = [-(-(new + old) // block_size) for new, old in lengths]
    num_blocks = sum(blocks_needed) + 2
    order = rng.permutation(num_blocks)  # shuffled: a sequence's blocks are scattered
    tables, at = [], 0
    for need in blocks_needed:
        tables.append(order[at:at + need])
        at += need
    return block_size, hkv, group, lengths, tables, num_blocks, rng


@given(paged_batches())
def test_cached_attention_through_block_tables_equals_direct_attention(case):
    block_size, hkv, group, lengths, tables, num_blocks, rng = case
    d = 4
    k_cache = np.zeros((num_blocks, block_size, hkv, d))
    v_cache = np.zeros_like(k_cache)
    queries, expected, slots = [], [], []
    for (new, old), table in zip(lengths, tables, strict=True):
        k, v = rng.standard_normal((2, new + old, hkv, d))
        q = rng.standard_normal((new, hkv * group, d))
        positions = np.arange(new + old)
        seq_slots = table[positions // block_size] * block_size + positions % block_size
        write_kv(k_cache, v_cache, k[:old], v[:old], seq_slots[:old])  # earlier chunks, already cached
        slots.append(seq_slots[old:])
        queries.append((q, k[old:], v[old:]))
        expected.append(causal_attention(q, k, v, 0.5))
    q_all = np.concatenate([q for q, _, _ in queries])
    write_kv(k_cache, v_cache, np.concatenate([k for _, k, _ in queries]),
             np.concatenate([v for _, _, v in queries]), np.concatenate(slots))
    block_tables = np.full((len(tables), max(len(t) for t in tables)), -1)
    for s, table in enumerate(tables):
        block_tables[s, :len(table)] = table
    query_start_loc = np.concatenate([[0], np.cumsum([new for new, _ in lengths])])
    context_lens = np.array([new + old for new, old in lengths])
    out = cached_attention(q_all, k_cache, v_cache, block_tables, query_start_loc, context_lens, 0.5)
    np.testing.assert_allclose(out, np.concatenate(expected), rtol=1e-6, atol=1e-9)


@given(st.integers(1, 40), st.integers(1, 48), st.integers(1, 48), st.booleans(), st.integers(0, 2**31))
def test_linear_is_the_same_product_for_either_memory_order(n, in_features, out_features, with_bias, seed):
    """A runner stores some weights row-major and some column-major (decode_order), and
    linear hands the two to BLAS in different ways: both are ``x @ W.T + b``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, in_features)).astype(np.float32)
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32) if with_bias else None
    expected = x.astype(np.float64) @ weight.T.astype(np.float64) + (0 if bias is None else bias)
    for stored in (np.ascontiguousarray(weight), np.asfortranarray(weight)):
        y = linear(x, stored, bias)
        assert y.shape == (n, out_features) and y.dtype == np.float32
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.sqrt(in_features))
        np.testing.assert_allclose(linear(x[None], stored, bias)[0], y, rtol=1e-5, atol=1e-5)  # leading axes too


def test_write_kv_skips_negative_slots():
    k_cache = np.zeros((2, 2, 1, 1))
    v_cache = np.zeros_like(k_cache)
    write_kv(k_cache, v_cache, np.ones((2, 1, 1)), np.ones((2, 1, 1)), np.array([3, -1]))
    assert k_cache.reshape(-1).tolist() == [0, 0, 0, 1]


@given(st.lists(st.integers(1, 20), min_size=1, max_size=5), st.sampled_from([1, 2, 4, 8]),
       st.sampled_from([(2, 1), (4, 2), (2, 2)]), st.integers(0, 2**31))
def test_batched_decode_attention_equals_one_sequence_at_a_time(context_lens, block_size, heads, seed):
    from minibatch.attention import decode_attention

    rng = np.random.default_rng(seed)
    hq, hkv = heads
    blocks = [-(-n // block_size) for n in context_lens]
    order = rng.permutation(sum(blocks))
    tables = np.full((len(blocks), max(blocks)), -1)
    for s, start in enumerate(np.cumsum([0, *blocks[:-1]])):
        tables[s, :blocks[s]] = order[start:start + blocks[s]]
    k_cache, v_cache = rng.standard_normal((2, sum(blocks), block_size, hkv, 4))
    q = rng.standard_normal((len(blocks), hq, 4))
    batched = decode_attention(q, k_cache, v_cache, tables, np.array(context_lens), 0.7)
    for s, n in enumerate(context_lens):
        positions = np.arange(n)
        slots = tables[s][positions // block_size] * block_size + positions % block_size
        k = k_cache.reshape(-1, hkv, 4)[slots]
        v = v_cache.reshape(-1, hkv, 4)[slots]
        np.testing.assert_allclose(batched[s], causal_attention(q[s:s + 1], k, v, 0.7)[0], rtol=1e-6, atol=1e-9)


@given(st.lists(st.integers(1, 300), max_size=40), st.sampled_from([4, 64, 512]), st.integers(1, 50_000))
def test_decode_groups_partition_longest_first_within_the_byte_limit(context_lens, row_bytes, max_bytes):
    from minibatch.attention import decode_groups

    lens = np.array(context_lens, dtype=np.int64)
    groups = decode_groups(lens, row_bytes, max_bytes)
    flat = np.concatenate(groups) if groups else np.array([], dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lens)))  # every sequence exactly once
    assert np.all(np.diff(lens[flat]) <= 0)  # longest first, so each group pads to its own first
    for group in groups:
        padded_bytes = len(group) * int(lens[group[0]]) * row_bytes
        assert len(group) == 1 or padded_bytes <= max_bytes
        assert (len(group) + 1) * int(lens[group[0]]) * row_bytes > max_bytes or group is groups[-1]


@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.sampled_from([1, 4, 16]), st.integers(0, 2**31))
def test_cached_attention_decode_grouping_changes_nothing(context_lens, block_size, seed):
    import minibatch.attention as attention

    rng = np.random.default_rng(seed)
    hq, hkv, d = 4, 2, 8
    blocks = [-(-n // block_size) for n in context_lens]
    order = rng.permutation(sum(blocks))
    tables = np.full((len(blocks), max(blocks)), -1)
    for s, start in enumerate(np.cumsum([0, *blocks[:-1]])):
        tables[s, :blocks[s]] = order[start:start + blocks[s]]
    k_cache, v_cache = rng.standard_normal((2, sum(blocks), block_size, hkv, d)).astype(np.float32)
    q = rng.standard_normal((len(blocks), hq, d)).astype(np.float32)
    args = (q, k_cache, v_cache, tables, np.arange(len(blocks) + 1), np.array(context_lens), 0.4)
    one_group = attention.cached_attention(*args)
    saved = attention.DECODE_GROUP_BYTES
    try:
        attention.DECODE_GROUP_BYTES = 1  # one sequence per group
        one_each = attention.cached_attention(*args)
    finally:
        attention.DECODE_GROUP_BYTES = saved
    # float32, and a group gathers as many keys as its longest context, so a sequence's sums run over
    # different lengths in the two layouts: equal up to rounding (any mix-up would be off by O(1))
    np.testing.assert_allclose(one_each, one_group, rtol=1e-5, atol=1e-6)
