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

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minibatch.backend import Backend, numpy_backend
from minibatch.config import ModelConfig
from minibatch.kv_cache import KVStorage
from minibatch.layers import rope_inverse_frequencies
from minibatch.quant import QuantizedWeight

# ---------------------------------------------------------------------------- weights


@dataclass(slots=True)
class LayerWeights:
    """One decoder block. Linear weights are ``[out, in]``, as in Hugging Face."""

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


@dataclass(slots=True)
class ModelWeights:
    """All weights of a decoder. ``lm_head is embed_tokens`` when embeddings are tied."""

    embed_tokens: Any  # [V, H]
    layers: list[LayerWeights]
    final_norm: Any  # [H]
    lm_head: Any  # [V, H]

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

        layers = [LayerWeights(**{name: once(getattr(layer, name)) for name in LayerWeights.__slots__})
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
        )


# ------------------------------------------------------------------------ forward pass


def decoder_layer(ops: Backend, config: ModelConfig, w: LayerWeights, x: Any, batch: ForwardBatch,
                  device_batch: dict[str, Any], inv_freq: Any, kv: dict[str, Any]) -> Any:
    """One pre-norm decoder block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""
    n, d = x.shape[0], config.head_dim
    h = ops.rms_norm(x, w.input_norm, config.rms_norm_eps)  # [N, H]
    q = ops.linear(h, w.q_proj, w.q_bias).reshape(n, config.num_heads, d)  # [N, Hq, D]
    k = ops.linear(h, w.k_proj, w.k_bias).reshape(n, config.num_kv_heads, d)  # [N, Hkv, D]
    v = ops.linear(h, w.v_proj, w.v_bias).reshape(n, config.num_kv_heads, d)  # [N, Hkv, D]
    q = ops.apply_rope(q, device_batch["positions"], inv_freq)  # [N, Hq, D]
    k = ops.apply_rope(k, device_batch["positions"], inv_freq)  # [N, Hkv, D]
    ops.write_kv(kv["k_cache"], kv["v_cache"], k, v, device_batch["slot_mapping"],
                 kv["k_scale"], kv["v_scale"])
    attn = ops.cached_attention(q, kv["k_cache"], kv["v_cache"], device_batch["block_tables"],
                                batch.query_start_loc, batch.context_lens, d ** -0.5,
                                kv["k_scale"], kv["v_scale"])  # [N, Hq, D]
    x = x + ops.linear(attn.reshape(n, -1), w.o_proj)  # [N, H]
    h = ops.rms_norm(x, w.post_attention_norm, config.rms_norm_eps)  # [N, H]
    mlp = ops.swiglu(ops.linear(h, w.gate_proj), ops.linear(h, w.up_proj))  # [N, I]
    return x + ops.linear(mlp, w.down_proj)  # [N, H]


def forward(ops: Backend, config: ModelConfig, weights: ModelWeights, batch: ForwardBatch,
            kv: KVStorage, inv_freq: Any) -> Any:
    """Run one step: write the batch's K/V into ``kv``, return logits ``[L, V]``
    for the tokens ``batch.logits_indices`` names (on the backend's device)."""
    device_batch = {name: ops.asarray(getattr(batch, name))
                    for name in ("token_ids", "positions", "block_tables", "slot_mapping")}
    x = ops.embedding(weights.embed_tokens, device_batch["token_ids"])  # [N, H]
    for i, layer in enumerate(weights.layers):
        x = decoder_layer(ops, config, layer, x, batch, device_batch, inv_freq, kv.layer(i))
    x = x[ops.asarray(batch.logits_indices)]  # [L, H] only where we sample
    x = ops.rms_norm(x, weights.final_norm, config.rms_norm_eps)  # [L, H]
    return ops.linear(x, weights.lm_head)  # [L, V]


def to_backend(backend: Backend, tensor: Any) -> Any:
    """A host weight on ``backend``: float32, except that a quantized weight's arrays move
    as they are (packed integers stay packed integers)."""
    if isinstance(tensor, QuantizedWeight):
        return tensor.map_arrays(backend.asarray)
    return backend.asarray(tensor, dtype=np.float32)


class ModelRunner:
    """Holds a model's weights and KV storage on one backend and runs forward batches.

    ``run(batch)`` returns host float32 logits, so everything above the runner
    (sampling, the engine) is plain NumPy whatever the backend.
    """

    def __init__(self, config: ModelConfig, weights: ModelWeights, backend: Backend | None = None,
                 kv_cache_dtype: str = "float32"):
        self.config = config
        self.kv_cache_dtype = kv_cache_dtype
        self.backend = backend or numpy_backend()
        self.weights = weights.map(lambda t: to_backend(self.backend, t))
        self.inv_freq = self.backend.asarray(rope_inverse_frequencies(config))
        self.kv: KVStorage | None = None

    def allocate_kv(self, num_blocks: int, block_size: int) -> KVStorage:
        """(Re)allocate the KV pools: ``num_blocks`` blocks of ``block_size`` slots per layer."""
        self.kv = None  # free the old pools first
        self.kv = self.new_kv(num_blocks, block_size)
        return self.kv

    def new_kv(self, num_blocks: int, block_size: int) -> KVStorage:
        """Separate KV pools on this runner's backend (e.g. for a one-off scoring pass)."""
        return KVStorage.allocate(self.config, num_blocks, block_size, xp=self.backend.xp,
                                  kv_cache_dtype=self.kv_cache_dtype)

    def run(self, batch: ForwardBatch, kv: KVStorage | None = None) -> np.ndarray:
        """Forward one batch (after the block copies it asks for) on ``kv`` (default: the
        runner's own pools); returns ``[len(batch.logits_indices), V]`` float32 on the host."""
        kv = kv or self.kv
        if kv is None:
            raise RuntimeError("call allocate_kv() before run()")
        if len(batch.block_copies):
            copies = self.backend.asarray(batch.block_copies)
            for i in range(self.config.num_layers):
                layer = kv.layer(i)
                self.backend.copy_blocks(layer["k_cache"], layer["v_cache"], copies, layer["k_scale"],
                                         layer["v_scale"])
        logits = forward(self.backend, self.config, self.weights, batch, kv, self.inv_freq)
        return self.backend.to_numpy(logits).astype(np.float32, copy=False)
