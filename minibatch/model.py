"""The Llama-family decoder: weights, the forward batch, and the forward pass.

The forward pass runs over a *flat, ragged* batch (the ``ForwardBatch``): the new tokens
of every sequence are concatenated into one ``[N]`` array, with ``query_start_loc``
marking where each sequence starts. There is no padding, and a prefill, a prefill chunk
and a decode step are all the same call (Prepacking; vLLM's varlen layout). Each token's
K/V is written to the cache slot ``slot_mapping`` names, then attention reads each
sequence's context back through its block table.

The math goes through a :class:`~minibatch.backend.Backend`, so the same function runs
on NumPy or on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from minibatch.backend import Backend, numpy_backend
from minibatch.config import ModelConfig
from minibatch.kv_cache import KVStorage
from minibatch.layers import rope_inverse_frequencies
from minibatch.quant import QuantizedWeight, concatenate_rows

# ---------------------------------------------------------------------------- weights


@dataclass(slots=True)
class LayerWeights:
    """One decoder block as a checkpoint stores it. Linear weights are ``[out, in]``, as in
    Hugging Face."""

    input_norm: Any  # [H]
    q_proj: Any  # [Hq*D, H]
    k_proj: Any  # [Hkv*D, H]
    v_proj: Any  # [Hkv*D, H]
    o_proj: Any  # [H, Hq*D]
    post_attention_norm: Any  # [H]
    gate_proj: Any  # [I, H]
    up_proj: Any  # [I, H]
    down_proj: Any  # [H, I]
    q_bias: Any = None  # [Hq*D] (Qwen2)
    k_bias: Any = None  # [Hkv*D]
    v_bias: Any = None  # [Hkv*D]


def decode_order(weight: Any) -> Any:
    """A float ``[out, in]`` weight in the memory order its decode GEMV streams fastest;
    a quantized weight as it is. Shape and values do not change, so
    :func:`~minibatch.layers.linear` gives the same result.

    A GEMV reads every weight once, and a CPU streams long contiguous runs of memory faster
    than short ones. Stored column by column (Fortran order), ``x @ weight.T`` adds ``x[j]``
    times the contiguous column ``weight[:, j]``, ``out`` long, for each input (BLAS's
    ``gemv_n``); stored row by row, it takes one dot product of a contiguous row, ``in``
    long, per output. So a matrix with at least as many outputs as inputs (q/k/v, gate/up,
    o_proj, the LM head) goes column-major, and one with more inputs (``down_proj``: 1536
    in, 576 out in SmolLM2-135M) row-major.
    """
    if isinstance(weight, QuantizedWeight):
        return weight
    out_features, in_features = weight.shape
    return np.asfortranarray(weight) if out_features >= in_features else np.ascontiguousarray(weight)


@dataclass(slots=True)
class FusedLayerWeights:
    """One decoder block as a backend runs it: q, k and v stacked into one ``qkv_proj``,
    gate and up into one ``gate_up_proj`` (vLLM's QKVParallelLinear and
    MergedColumnParallelLinear), float matrices stored in :func:`decode_order`.

    Why fused: a decode step is one GEMV per projection, and a small GEMV (k_proj is
    192x576 in SmolLM2-135M) streams its weights well below memory bandwidth, on top of a
    fixed cost per call. One bigger GEMV reads the same bytes closer to bandwidth, in 4
    calls per layer instead of 7. Checkpoints keep Hugging Face's separate, row-major
    tensors; a :class:`ModelRunner` fuses them as it loads (:meth:`fuse`).
    """

    input_norm: Any  # [H]
    qkv_proj: Any  # [(Hq+2Hkv)*D, H]: q_proj, k_proj, v_proj stacked along the output rows
    o_proj: Any  # [H, Hq*D]
    post_attention_norm: Any  # [H]
    gate_up_proj: Any  # [2I, H]: gate_proj, then up_proj
    down_proj: Any  # [H, I]
    qkv_bias: Any = None  # [(Hq+2Hkv)*D] (Qwen2)

    @classmethod
    def fuse(cls, layer: LayerWeights) -> FusedLayerWeights:
        """Stack a checkpoint layer's projections (host arrays, float or quantized) and store
        the float ones in :func:`decode_order`."""
        has_bias = layer.q_bias is not None
        return cls(input_norm=layer.input_norm,
                   qkv_proj=decode_order(concatenate_rows([layer.q_proj, layer.k_proj, layer.v_proj])),
                   o_proj=decode_order(layer.o_proj), post_attention_norm=layer.post_attention_norm,
                   gate_up_proj=decode_order(concatenate_rows([layer.gate_proj, layer.up_proj])),
                   down_proj=decode_order(layer.down_proj),
                   qkv_bias=np.concatenate([layer.q_bias, layer.k_bias, layer.v_bias]) if has_bias else None)


@dataclass(slots=True)
class ModelWeights:
    """All weights of a decoder. ``lm_head is embed_tokens`` when embeddings are tied.

    ``layers`` are :class:`LayerWeights` as loaded from (and saved to) a checkpoint, or
    :class:`FusedLayerWeights` in the :meth:`runtime_layout` a model runner holds.
    """

    embed_tokens: Any  # [V, H]
    layers: list[LayerWeights] | list[FusedLayerWeights]
    final_norm: Any  # [H]
    lm_head: Any  # [V, H]

    def runtime_layout(self) -> ModelWeights:
        """These weights as a :class:`ModelRunner` holds them: every layer's q/k/v and gate/up
        stacked (:class:`FusedLayerWeights`), and every float matrix in :func:`decode_order`,
        the LM head too (column-major). A tied embedding goes column-major with it: a lookup
        then reads each token's row with a stride, a small cost next to the GEMV over the
        whole vocabulary that gets faster."""
        lm_head = decode_order(self.lm_head)
        embed_tokens = lm_head if self.lm_head is self.embed_tokens else self.embed_tokens
        return replace(self, embed_tokens=embed_tokens, lm_head=lm_head,
                       layers=[FusedLayerWeights.fuse(layer) for layer in self.layers])

    def map(self, fn: Any) -> ModelWeights:
        """A copy with ``fn`` applied to every tensor (e.g. to move it to a device).

        A :class:`~minibatch.quant.QuantizedWeight` is passed to ``fn`` whole.
        """
        moved: dict[int, Any] = {}

        def once(tensor: Any) -> Any:  # tied tensors stay one tensor
            if tensor is None:
                return None
            if id(tensor) not in moved:
                moved[id(tensor)] = fn(tensor)
            return moved[id(tensor)]

        layers = [type(layer)(**{name: once(getattr(layer, name)) for name in layer.__slots__})
                  for layer in self.layers]
        return ModelWeights(embed_tokens=once(self.embed_tokens), layers=layers,
                            final_norm=once(self.final_norm), lm_head=once(self.lm_head))

    @property
    def num_bytes(self) -> int:
        """Bytes held by the weights, counting a tied tensor once (a quantized weight: its
        integers, scales and zero points)."""
        seen: dict[int, int] = {}
        self.map(lambda t: seen.setdefault(id(t), int(t.nbytes)))
        return sum(seen.values())


# ----------------------------------------------------------------------- forward batch


@dataclass(slots=True)
class ForwardBatch:
    """The seam between the engine and a model runner: one step's work, flat and ragged.

    All arrays are host NumPy integers. For ``S`` sequences and ``N`` new tokens:
    """

    token_ids: np.ndarray  # [N] the new tokens of every sequence, concatenated
    positions: np.ndarray  # [N] each token's position in its sequence
    query_start_loc: np.ndarray  # [S+1] sequence s owns tokens [qsl[s], qsl[s+1])
    context_lens: np.ndarray  # [S] tokens in the cache after this step, new ones included
    block_tables: np.ndarray  # [S, max_blocks] block ids of each sequence (-1 = unused)
    slot_mapping: np.ndarray  # [N] flat cache slot each new token's K/V is written to
    logits_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [L]
    block_copies: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # [P, 2] (src, dst)
    # a KIVI cache only: each sequence's residual row, and rows to copy first (forks)
    residual_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [S]
    row_copies: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # [R, 2] (src, dst)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @classmethod
    def build(cls, sequences: list[tuple[list[int], int, list[int], np.ndarray]],
              logits: str = "last") -> ForwardBatch:
        """Assemble a batch from ``(new_token_ids, start_position, block_table, slots)``.

        ``logits="last"`` asks for each sequence's last token (generation),
        ``"all"`` for every token (scoring, speculative verification).
        """
        lengths = [len(tokens) for tokens, _, _, _ in sequences]
        query_start_loc = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        max_blocks = max((len(table) for _, _, table, _ in sequences), default=0)
        block_tables = np.full((len(sequences), max_blocks), -1, dtype=np.int32)
        for s, (_, _, table, _) in enumerate(sequences):
            block_tables[s, : len(table)] = table
        positions = [np.arange(start, start + len(tokens)) for tokens, start, _, _ in sequences]
        if logits == "last":
            logits_indices = query_start_loc[1:] - 1
        elif logits == "all":
            logits_indices = np.arange(query_start_loc[-1])
        else:
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        return cls(
            token_ids=np.concatenate([np.asarray(t, np.int64) for t, _, _, _ in sequences]),
            positions=np.concatenate(positions).astype(np.int64),
            query_start_loc=query_start_loc,
            context_lens=np.array([start + len(t) for t, start, _, _ in sequences], dtype=np.int64),
            block_tables=block_tables,
            slot_mapping=np.concatenate([np.asarray(slots, np.int64) for _, _, _, slots in sequences]),
            logits_indices=np.asarray(logits_indices, dtype=np.int64),
            residual_rows=np.arange(len(sequences), dtype=np.int64),  # one row each; the engine reassigns
        )


# ------------------------------------------------------------------------ forward pass


def qkv_projections(ops: Backend, config: ModelConfig, w: FusedLayerWeights | LayerWeights,
                    h: Any) -> tuple[Any, Any]:
    """Queries and keys side by side, and values: ``[N, H] -> [N, Hq+Hkv, D], [N, Hkv, D]``.

    Queries and keys come as one array, heads ``0..Hq-1`` the queries and the rest the
    keys, because RoPE rotates both by the same angles: one call rotates them together
    (as vLLM's rotary embedding takes query and key at once). Fused weights (what a
    :class:`ModelRunner` holds) take one GEMV whose output columns are split into views;
    a checkpoint's :class:`LayerWeights` take three (a runner built with
    ``checkpoint_layout=True``, which the decode benchmark times for comparison).
    """
    n, d = h.shape[0], config.head_dim
    qk_heads = config.num_heads + config.num_kv_heads
    if isinstance(w, FusedLayerWeights):
        qkv = ops.linear(h, w.qkv_proj, w.qkv_bias)  # [N, (Hq+2Hkv)*D]
        qk, v = qkv[:, :qk_heads * d], qkv[:, qk_heads * d:]  # views, no copies
    else:
        q = ops.linear(h, w.q_proj, w.q_bias)  # [N, Hq*D]
        k = ops.linear(h, w.k_proj, w.k_bias)  # [N, Hkv*D]
        v = ops.linear(h, w.v_proj, w.v_bias)  # [N, Hkv*D]
        qk = ops.xp.concatenate([q, k], axis=1)  # [N, (Hq+Hkv)*D]
    return qk.reshape(n, qk_heads, d), v.reshape(n, config.num_kv_heads, d)


def gate_up_projections(ops: Backend, w: FusedLayerWeights | LayerWeights, h: Any) -> tuple[Any, Any]:
    """The MLP's gate and up projections: ``[N, H] -> [N, I], [N, I]``; one GEMV split
    into two views for fused weights, two GEMVs for a checkpoint's :class:`LayerWeights`."""
    if isinstance(w, FusedLayerWeights):
        gate_up = ops.linear(h, w.gate_up_proj)  # [N, 2I]
        i = gate_up.shape[1] // 2
        return gate_up[:, :i], gate_up[:, i:]  # [N, I] each, views
    return ops.linear(h, w.gate_proj), ops.linear(h, w.up_proj)


def decoder_layer(ops: Backend, config: ModelConfig, w: FusedLayerWeights | LayerWeights, x: Any,
                  batch: ForwardBatch, device_batch: dict[str, Any], rope: tuple[Any, Any], kv: dict[str, Any]) -> Any:
    """One pre-norm decoder block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

    ``rope`` is ``(cos, sin)`` of the batch's positions (:func:`~minibatch.layers.rope_cos_sin`),
    computed once per forward pass for every layer."""
    n, d = x.shape[0], config.head_dim
    h = ops.rms_norm(x, w.input_norm, config.rms_norm_eps)  # [N, H]
    qk, v = qkv_projections(ops, config, w, h)  # [N, Hq+Hkv, D], [N, Hkv, D]
    qk = ops.apply_rope(qk, *rope)  # [N, Hq+Hkv, D]
    q, k = qk[:, :config.num_heads], qk[:, config.num_heads:]  # [N, Hq, D], [N, Hkv, D]
    if "k_residual" in kv:  # a KIVI cache stores and attends in one call (minibatch/kivi.py)
        attn = ops.kivi_attention(q, k, v, **kv, block_tables=device_batch["block_tables"],
                                  residual_rows=device_batch["residual_rows"],
                                  query_start_loc=batch.query_start_loc, context_lens=batch.context_lens,
                                  scale=d ** -0.5)  # [N, Hq, D]
    else:
        ops.write_kv(kv["k_cache"], kv["v_cache"], k, v, device_batch["slot_mapping"],
                     kv["k_scale"], kv["v_scale"])
        attn = ops.cached_attention(q, kv["k_cache"], kv["v_cache"], device_batch["block_tables"],
                                    batch.query_start_loc, batch.context_lens, d ** -0.5,
                                    kv["k_scale"], kv["v_scale"])  # [N, Hq, D]
    x = x + ops.linear(attn.reshape(n, -1), w.o_proj)  # [N, H]
    h = ops.rms_norm(x, w.post_attention_norm, config.rms_norm_eps)  # [N, H]
    mlp = ops.swiglu(*gate_up_projections(ops, w, h))  # [N, I]
    return x + ops.linear(mlp, w.down_proj)  # [N, H]


def forward(ops: Backend, config: ModelConfig, weights: ModelWeights, batch: ForwardBatch,
            kv: KVStorage, inv_freq: Any) -> Any:
    """Run one step: write the batch's K/V into ``kv``, return logits ``[L, V]``
    for the tokens ``batch.logits_indices`` names (on the backend's device)."""
    device_batch = {name: ops.asarray(getattr(batch, name))
                    for name in ("token_ids", "positions", "block_tables", "slot_mapping", "residual_rows")}
    x = ops.embedding(weights.embed_tokens, device_batch["token_ids"])  # [N, H]
    rope = ops.rope_cos_sin(device_batch["positions"], inv_freq)  # [N, D/2] twice, for every layer
    for i, layer in enumerate(weights.layers):
        x = decoder_layer(ops, config, layer, x, batch, device_batch, rope, kv.layer(i))
    x = x[ops.asarray(batch.logits_indices)]  # [L, H] only where we sample
    x = ops.rms_norm(x, weights.final_norm, config.rms_norm_eps)  # [L, H]
    return ops.linear(x, weights.lm_head)  # [L, V]


def to_backend(backend: Backend, tensor: Any) -> Any:
    """A host weight on ``backend``: float32 in its memory order (row- or column-major),
    except that a quantized weight's arrays move as they are (packed integers stay packed
    integers)."""
    if isinstance(tensor, QuantizedWeight):
        return tensor.map_arrays(backend.asarray)
    return backend.asarray(tensor, dtype=np.float32)


class ModelRunner:
    """Holds a model's weights and KV storage on one backend and runs forward batches.

    ``run(batch)`` returns host float32 logits, so everything above the runner
    (sampling, the engine) is plain NumPy whatever the backend. ``weights`` are a
    checkpoint's; the runner keeps them in their :meth:`~ModelWeights.runtime_layout`
    (fused projections, matrices in :func:`decode_order`), or as they are with ``checkpoint_layout=True``.
    """

    def __init__(self, config: ModelConfig, weights: ModelWeights, backend: Backend | None = None,
                 kv_cache_dtype: str = "float32", checkpoint_layout: bool = False):
        self.config = config
        self.kv_cache_dtype = kv_cache_dtype
        self.backend = backend or numpy_backend()
        if not checkpoint_layout:
            weights = weights.runtime_layout()  # on the host, before the move
        self.weights = weights.map(lambda t: to_backend(self.backend, t))
        self.inv_freq = self.backend.asarray(rope_inverse_frequencies(config))
        self.kv: KVStorage | None = None

    def allocate_kv(self, num_blocks: int, block_size: int, num_residual_rows: int = 1) -> KVStorage:
        """(Re)allocate the KV pools: ``num_blocks`` blocks of ``block_size`` slots per layer
        (and, for a KIVI cache, ``num_residual_rows`` rows: one per sequence run at once)."""
        self.kv = None  # free the old pools first
        self.kv = self.new_kv(num_blocks, block_size, num_residual_rows)
        return self.kv

    def new_kv(self, num_blocks: int, block_size: int, num_residual_rows: int = 1) -> KVStorage:
        """Separate KV pools on this runner's backend (e.g. for a one-off scoring pass)."""
        return KVStorage.allocate(self.config, num_blocks, block_size, xp=self.backend.xp,
                                  kv_cache_dtype=self.kv_cache_dtype, num_residual_rows=num_residual_rows)

    def run(self, batch: ForwardBatch, kv: KVStorage | None = None) -> np.ndarray:
        """Forward one batch (after the block copies it asks for) on ``kv`` (default: the
        runner's own pools); returns ``[len(batch.logits_indices), V]`` float32 on the host."""
        kv = kv or self.kv
        if kv is None:
            raise RuntimeError("call allocate_kv() before run()")
        if kv.is_kivi and len(batch.row_copies):  # a fork: the child starts from its parent's residual
            copies = self.backend.asarray(batch.row_copies)
            for i in range(self.config.num_layers):
                self.backend.copy_blocks(kv.k_residual[i], kv.v_residual[i], copies)
        elif not kv.is_kivi and len(batch.block_copies):  # (KIVI keeps a shared partial block in the residual)
            copies = self.backend.asarray(batch.block_copies)
            for i in range(self.config.num_layers):
                layer = kv.layer(i)
                self.backend.copy_blocks(layer["k_cache"], layer["v_cache"], copies, layer["k_scale"],
                                         layer["v_scale"])
        logits = forward(self.backend, self.config, self.weights, batch, kv, self.inv_freq)
        return self.backend.to_numpy(logits).astype(np.float32, copy=False)
