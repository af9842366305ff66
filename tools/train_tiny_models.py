"""Train the two embedded byte-level models (target and draft) on CPU.

The models shipped in ``minibatch/models/tiny-target`` and
``minibatch/models/tiny-draft`` are small ``LlamaForCausalLM`` models with a
byte-level vocabulary (ids 0..255 are bytes, 256 is BOS, 257 is EOS), trained
on the Python sources of the CPython standard library (see
``tools/stdlib_corpus.py``). They exist for teaching and for speculative
decoding demos; they are not useful code models.

PyTorch and transformers are developer-only dependencies of this script; the
``minibatch`` package itself never imports them. Install them with::

    pip install -e .[train]

Then re-create the shipped assets with::

    python tools/train_tiny_models.py --out minibatch/models \\
        --target-steps N --draft-steps M

Useful extras:

* ``--measure`` runs a few steps of each model and prints tokens/s, to pick
  step counts that fit a time budget.
* ``--models target`` (or ``draft``) trains only one model; the other one
  must already exist in ``--out`` for evaluation.
* ``--models`` with no names skips training and only re-evaluates the
  checkpoints in ``--out`` and rewrites ``eval.json`` and ``README.md``;
  ``--cards-only`` just re-renders ``README.md`` from the existing files.
* ``--continue-training`` starts from the models already exported in
  ``--out`` and trains a further stage (fresh optimizer and schedule); the
  training log and model card then list every stage.
* ``--widen-mlp SIZE`` (with ``--continue-training``) first grows the SwiGLU
  MLP of the exported model to ``SIZE`` hidden units without changing the
  function it computes (see :func:`widen_mlp_state`), then trains that stage.

Training state is checkpointed to ``--work-dir`` every ``--ckpt-every`` steps
and resumed from there automatically when the step count matches.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from stdlib_corpus import BOS_ID, EOS_ID, VOCAB_SIZE, CorpusSplit, load_corpus
from transformers import LlamaConfig, LlamaForCausalLM

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef ", "class Stack:\n    def ", "    for i in range("]
HELDOUT_SAMPLE_BYTES = 32 * 1024


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one of the tiny models."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool


SPECS = {
    "target": ModelSpec("target", 256, 4, 8, 4, 768, False),
    "draft": ModelSpec("draft", 128, 2, 4, 2, 352, True),
}


@dataclass
class TrainConfig:
    """Optimisation hyper-parameters shared by both models."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    seed: int
    top_level_fraction: float = 0.0


# --------------------------------------------------------------------------
# Model construction and data
# --------------------------------------------------------------------------


def build_config(spec: ModelSpec) -> LlamaConfig:
    """Return the ``LlamaConfig`` for a model spec."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def build_model(spec: ModelSpec, seed: int) -> LlamaForCausalLM:
    """Create a freshly initialised float32 model."""
    seed_everything(seed)
    config = build_config(spec)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float()


def count_params(model: torch.nn.Module) -> int:
    """Count unique parameters (tied weights are counted once)."""
    return sum(p.numel() for p in model.parameters())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def widen_mlp_state(state: dict, old: int, new: int, std: float, seed: int) -> dict:
    """Grow every layer's SwiGLU MLP from ``old`` to ``new`` hidden units.

    The ``new - old`` extra units get gate and up rows drawn from N(0, std^2)
    and all-zero down_proj columns, so their ``silu(gate) * up`` output is
    multiplied by zero and the network computes exactly the same function.
    The down columns still receive gradient, so the new units start learning
    at the first step.
    """
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, w in state.items():
        if key.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            assert w.shape[0] == old, (key, tuple(w.shape))
            extra = torch.randn(new - old, w.shape[1], generator=gen, dtype=w.dtype) * std
            out[key] = torch.cat([w, extra], dim=0)
        elif key.endswith("mlp.down_proj.weight"):
            assert w.shape[1] == old, (key, tuple(w.shape))
            out[key] = torch.cat([w, w.new_zeros(w.shape[0], new - old)], dim=1)
    return out


@torch.no_grad()
def initial_model(
    spec: ModelSpec, cfg: TrainConfig, tokens: np.ndarray, init_from: Path | None, widen: bool
) -> tuple[LlamaForCausalLM, list[int] | None]:
    """The model a training stage starts from: fresh, or the exported model in
    ``init_from``, with its MLP widened to ``spec.intermediate_size`` when
    ``widen``. Returns the model and ``[old, new]`` intermediate sizes if widened."""
    model = build_model(spec, cfg.seed)
    if init_from is None:
        return model, None
    source = load_exported(init_from)
    old, new = source.config.intermediate_size, spec.intermediate_size
    if not widen:
        if old != new:
            raise SystemExit(f"{init_from} has intermediate_size {old}, spec says {new}: pass --widen-mlp {new}")
        model.load_state_dict(source.state_dict())
        return model, None
    if new <= old:
        raise SystemExit(f"--widen-mlp {new} must exceed the intermediate_size {old} of {init_from}")
    std = source.config.initializer_range
    model.load_state_dict(widen_mlp_state(source.state_dict(), old, new, std, cfg.seed))
    # The widened network must compute the same function, checked on a few windows.
    model.eval()
    probe, _ = sample_batch(tokens, 4, 256, np.random.default_rng(cfg.seed + 7))
    before = source(input_ids=probe, use_cache=False).logits
    diff = float((model(input_ids=probe, use_cache=False).logits - before).abs().max())
    print(f"[{spec.name}] widened MLP {old} -> {new}: max |logit diff| {diff:.2e}", flush=True)
    assert diff < 1e-5, f"widening changed the logits by {diff}"
    model.train()
    return model, [old, new]


def sample_batch(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator,
    top_level_fraction: float = 0.0,
    top_level_starts: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return random ``(inputs, targets)`` windows of the token stream.

    A fraction ``top_level_fraction`` of the windows are ``[BOS]`` followed by the
    stream from the start of a random top-level line (an index in
    ``top_level_starts``, see :func:`top_level_line_starts`): the shape of a user's
    prompt, encoded as ``[BOS] + text`` with its first line in column 0. Plain random
    windows show BOS only before a file's first line (a docstring, a comment, an
    import), so a model trained on them alone reads ``[BOS] def f(n):`` as a method
    nested somewhere, and greedy decoding indents its body without end.
    """
    n_prompt_like = round(batch_size * top_level_fraction)
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size - n_prompt_like)
    windows = [tokens[s : s + seq_len + 1] for s in starts]
    if n_prompt_like:
        assert top_level_starts is not None, "top_level_fraction needs top_level_starts"
        usable = top_level_starts[top_level_starts < len(tokens) - seq_len]
        for s in rng.choice(usable, size=n_prompt_like):
            windows.append(np.concatenate([[BOS_ID], tokens[s : s + seq_len]]))
    batch = torch.from_numpy(np.stack(windows).astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


def top_level_line_starts(tokens: np.ndarray) -> np.ndarray:
    """Indices of the first byte of every top-level line: one that follows a newline
    and starts with a byte that is not a space, tab or newline (``def``, ``class``,
    ``import``, a decorator, a comment in column 0)."""
    starts = np.flatnonzero(tokens[:-1] == ord("\n")) + 1
    return starts[~np.isin(tokens[starts], [ord(" "), ord("\t"), ord("\n")])]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup followed by cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(model: LlamaForCausalLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats."""
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def save_checkpoint(path: Path, model, optimizer, step: int, log: dict, rng) -> None:
    """Write resumable training state atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "log": log,
        "rng": rng.bit_generator.state,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_model(
    spec: ModelSpec,
    cfg: TrainConfig,
    tokens: np.ndarray,
    work_dir: Path,
    ckpt_every: int,
    init_from: Path | None = None,
    stage: int = 1,
    widen: bool = False,
) -> tuple[LlamaForCausalLM, dict]:
    """Train one model, resuming from ``work_dir`` when possible. With ``init_from`` (an
    exported model directory) training continues from those weights with a fresh
    optimizer and learning-rate schedule: stage number ``stage`` (2 or more). With
    ``widen`` the exported MLP is first grown to ``spec.intermediate_size``."""
    model, widened = initial_model(spec, cfg, tokens, init_from, widen)
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed + stage - 1)  # new windows in a new stage
    log = {"model": spec.name, "train_config": asdict(cfg), "points": [], "wall_time_s": 0.0}
    if widened:
        log["widened_mlp"] = widened
    start_step = 0
    suffix = "" if stage == 1 else "-continued" if stage == 2 else f"-stage{stage}"
    ckpt = work_dir / f"{spec.name}-steps{cfg.steps}{suffix}.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        start_step, log = state["step"], state["log"]
        print(f"[{spec.name}] resumed from {ckpt} at step {start_step}", flush=True)

    top_level_starts = top_level_line_starts(tokens) if cfg.top_level_fraction else None
    model.train()
    t_prev = time.perf_counter()
    window_loss, window_n = 0.0, 0
    for step in range(start_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs, targets = sample_batch(
            tokens, cfg.batch_size, cfg.seq_len, rng, cfg.top_level_fraction, top_level_starts
        )
        loss = lm_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        window_loss += loss.item()
        window_n += 1

        done = step + 1
        if done % 20 == 0 or done == cfg.steps:
            now = time.perf_counter()
            log["wall_time_s"] += now - t_prev
            t_prev = now
            point = {
                "step": done,
                "loss": round(window_loss / window_n, 4),
                "lr": round(lr_at(step, cfg), 6),
                "grad_norm": round(float(grad_norm), 3),
                "wall_time_s": round(log["wall_time_s"], 1),
            }
            log["points"].append(point)
            window_loss, window_n = 0.0, 0
            print(f"[{spec.name}] {point}", flush=True)
        if done % ckpt_every == 0 and done < cfg.steps:
            save_checkpoint(ckpt, model, optimizer, done, log, rng)

    log["wall_time_s"] = round(log["wall_time_s"], 1)
    log["tokens_seen"] = cfg.steps * cfg.batch_size * cfg.seq_len
    log["n_params"] = count_params(model)
    save_checkpoint(ckpt, model, optimizer, cfg.steps, log, rng)
    return model, log


def merge_stages(prior: dict, log: dict) -> dict:
    """One training log for a model trained in stages: totals over all stages, each
    stage's config, and the loss curve numbered by total step."""
    stages = prior.get("stages") or [
        {
            "train_config": prior["train_config"],
            "wall_time_s": prior["wall_time_s"],
            "tokens_seen": prior["tokens_seen"],
        }
    ]
    stage = {"train_config": log["train_config"], "wall_time_s": log["wall_time_s"], "tokens_seen": log["tokens_seen"]}
    if "widened_mlp" in log:
        stage["widened_mlp"] = log["widened_mlp"]
    stages = [*stages, stage]
    offset = sum(stage["train_config"]["steps"] for stage in stages[:-1])
    points = prior["points"] + [{**point, "step": point["step"] + offset} for point in log["points"]]
    return {
        **log,
        "stages": stages,
        "points": points,
        "total_steps": offset + log["train_config"]["steps"],
        "tokens_seen": sum(stage["tokens_seen"] for stage in stages),
        "wall_time_s": round(sum(stage["wall_time_s"] for stage in stages), 1),
    }


def export_model(model: LlamaForCausalLM, out_dir: Path, log: dict) -> None:
    """Save weights as float16 safetensors plus config and training log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    half = LlamaForCausalLM(model.config)
    half.load_state_dict(model.state_dict())
    half = half.half()
    half.config.dtype = torch.float16
    half.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "model.safetensors").chmod(0o644)  # the writer creates it private
    add_legacy_config_keys(out_dir / "config.json")
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


def add_legacy_config_keys(path: Path) -> None:
    """Also spell dtype and RoPE base the pre-v5 way, for simple config readers.

    transformers 5 writes ``dtype`` and ``rope_parameters.rope_theta``; older
    releases (and hand-written loaders) look for ``torch_dtype`` and a
    top-level ``rope_theta``. Both spellings load in transformers 5.
    """
    config = json.loads(path.read_text())
    config.setdefault("torch_dtype", config.get("dtype", "float16"))
    config.setdefault("rope_theta", config["rope_parameters"]["rope_theta"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def measure_throughput(
    spec: ModelSpec,
    cfg: TrainConfig,
    tokens: np.ndarray,
    steps: int,
    init_from: Path | None = None,
    widen: bool = False,
) -> float:
    """Return training tokens/s measured over ``steps`` steps (after one warmup),
    starting from the same model a training run would start from."""
    model, _ = initial_model(spec, cfg, tokens, init_from, widen)
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        inputs, targets = sample_batch(tokens, cfg.batch_size, cfg.seq_len, rng)
        loss = lm_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        times.append(time.perf_counter() - t0)
    per_step = sum(times[1:]) / steps
    tok_s = cfg.batch_size * cfg.seq_len / per_step
    print(
        f"[{spec.name}] params={count_params(model):,} {per_step:.2f} s/step  {tok_s:,.0f} tok/s",
        flush=True,
    )
    return tok_s


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def load_exported(out_dir: Path) -> LlamaForCausalLM:
    """Load a shipped float16 checkpoint as a float32 model."""
    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def heldout_windows(tokens: np.ndarray, window: int, max_windows: int | None, batch_size: int) -> list[np.ndarray]:
    """Cut a token stream into batches of overlapping-by-one windows.

    Window ``k`` is ``tokens[k * window : (k + 1) * window + 1]``, so every
    token after the first is a prediction target exactly once. The last window
    may be shorter; it goes into a batch of its own.
    """
    starts = list(range(0, len(tokens) - 1, window))[:max_windows]
    windows = [tokens[s : s + window + 1] for s in starts]
    full = [w for w in windows if len(w) == window + 1]
    batches = [np.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None, :] for w in windows if len(w) != window + 1]
    return batches


@torch.no_grad()
def evaluate_pair(
    target: LlamaForCausalLM,
    draft: LlamaForCausalLM,
    tokens: np.ndarray,
    window: int,
    max_windows: int | None,
    batch_size: int = 16,
) -> dict:
    """Held-out bits per byte of both models and their top-1 agreement.

    The held-out stream is cut into consecutive windows of ``window`` inputs
    (see :func:`heldout_windows`), so each token after the first is predicted
    exactly once, from a context of 1 to ``window`` tokens. Only predictions
    whose target is a byte (id < 256) are scored; BOS/EOS targets are excluded.
    """
    batches = heldout_windows(tokens, window, max_windows, batch_size)
    nll = {"target": 0.0, "draft": 0.0}
    agree, scored = 0, 0
    for chunk in batches:
        batch = torch.from_numpy(chunk.astype(np.int64))
        inputs, labels = batch[:, :-1], batch[:, 1:]
        mask = labels < 256
        logits_t = target(input_ids=inputs, use_cache=False).logits
        logits_d = draft(input_ids=inputs, use_cache=False).logits
        for name, logits in (("target", logits_t), ("draft", logits_d)):
            losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            nll[name] += float(losses[mask].sum())
        same = logits_t.argmax(-1) == logits_d.argmax(-1)
        agree += int(same[mask].sum())
        scored += int(mask.sum())
    return {
        "n_windows": sum(len(b) for b in batches),
        "window": window,
        "scored_bytes": scored,
        "target_bits_per_byte": nll["target"] / scored / math.log(2),
        "draft_bits_per_byte": nll["draft"] / scored / math.log(2),
        "draft_target_top1_agreement": agree / scored,
    }


@torch.no_grad()
def greedy_complete(model: LlamaForCausalLM, prompt: str, n_new: int) -> str:
    """Greedy byte-level continuation of ``prompt`` (stops at EOS)."""
    ids = [BOS_ID] + list(prompt.encode())
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=n_new,
        do_sample=False,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    new = [t for t in out[0, len(ids) :].tolist() if t < 256]
    return bytes(new).decode("utf-8", errors="replace")


def write_heldout_sample(corpus: CorpusSplit, out: Path, limit: int) -> int:
    """Write whole held-out files (up to about ``limit`` bytes) as UTF-8 text."""
    parts: list[str] = []
    size = 0
    tokens = corpus.heldout
    ends = np.flatnonzero(tokens == EOS_ID)
    begins = np.flatnonzero(tokens == BOS_ID) + 1
    for begin, end in zip(begins, ends, strict=True):
        doc = tokens[begin:end].astype(np.uint8).tobytes()
        try:
            decoded = doc.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if parts and size + len(doc) > limit:
            break
        parts.append(decoded)
        size += len(doc)
    out.write_text("".join(parts), encoding="utf-8")
    return size


# --------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------


def model_card(name: str, cfg: LlamaConfig, log: dict, meta: dict, ev: dict) -> str:
    """Render the README.md model card for one model."""
    tc = log["train_config"]
    role = (
        "It is the *target* model of the speculative decoding demos."
        if name == "target"
        else "It is the *draft* model of the speculative decoding demos: it proposes\n"
        "tokens that `tiny-target` verifies."
    )
    bpb = ev[f"{name}_bits_per_byte"]
    excluded = "`site-packages` and `__pycache__` excluded, sorted by relative path"
    stages = [stage["train_config"] for stage in log.get("stages", [])] or [tc]
    schedule = "; ".join(
        f"{'stage ' + str(i + 1) + ': ' if len(stages) > 1 else ''}{c['steps']:,} steps, peak {c['lr']:g}, "
        f"linear warmup over {c['warmup_steps']} steps, cosine decay to {c['lr'] * c['min_lr_ratio']:g}"
        for i, c in enumerate(stages)
    )
    widened = "".join(
        textwrap.fill(
            f"Before stage {i + 1} the SwiGLU MLP was widened from intermediate_size {st['widened_mlp'][0]} to "
            f"{st['widened_mlp'][1]} without changing the function the model computes (new gate and up rows "
            "small and random, new down_proj columns zero), and all weights then trained on.",
            width=78,
        )
        + "\n\n"
        for i, st in enumerate(log.get("stages", []))
        if "widened_mlp" in st
    )
    prompt_shaped = "".join(
        textwrap.fill(
            f"In stage {i + 1}, {st['train_config']['top_level_fraction']:.0%} of each batch's windows were "
            "`[BOS]` followed by the stream from the start of a random top-level line (one that begins in "
            "column 0): the shape of a prompt. Plain random windows show BOS only before a file's first line, "
            "and a model trained on them alone took `[BOS] def f(n):` for a nested method and, decoding "
            "greedily, indented its body with spaces without end.",
            width=78,
        )
        + "\n\n"
        for i, st in enumerate(log.get("stages", []))
        if st["train_config"].get("top_level_fraction")
    )
    completions = "\n\n".join(
        f"Prompt `{json.dumps(p)}`:\n\n```python\n{p}{c}\n```" for p, c in ev["completions"][name].items()
    )
    return f"""# tiny-{name}

A tiny byte-level language model with the Llama architecture
(`LlamaForCausalLM`), trained on the Python source of the CPython standard
library, made for teaching how LLM inference works.
{role}

It is **not** a useful code model: it has learned the look of Python source,
not how to write programs.

## Tokenizer

Byte-level, no merges: token id `i` in 0..255 is the byte `i`; `256` is BOS
`<s>` and `257` is EOS `</s>`. Vocabulary size 258. Every document is encoded
as `[BOS] + file bytes + [EOS]`.

## Data

| | |
|---|---|
| Source | every `*.py` file of the CPython {meta["python_version"]} standard library, {excluded} |
| Train | {meta["n_files_train"]:,} files, {meta["n_bytes_train"]:,} bytes |
| Held out | {meta["n_files_heldout"]:,} files, {meta["n_bytes_heldout"]:,} bytes |
| Held-out rule | a file is held out when `int(sha256(relpath).hexdigest(), 16) % 50 == 0` |
| Corpus sha256 | `{meta["sha256"]}` (all file bytes concatenated in path order) |

## Architecture

| | |
|---|---|
| Parameters | {log["n_params"]:,} |
| hidden_size | {cfg.hidden_size} |
| num_hidden_layers | {cfg.num_hidden_layers} |
| num_attention_heads | {cfg.num_attention_heads} (head_dim {cfg.head_dim}) |
| num_key_value_heads | {cfg.num_key_value_heads} |
| intermediate_size | {cfg.intermediate_size} (SwiGLU) |
| tie_word_embeddings | {str(cfg.tie_word_embeddings).lower()} |
| vocab_size | {cfg.vocab_size} |
| max_position_embeddings | {cfg.max_position_embeddings} |
| rope_theta | {cfg.rope_parameters["rope_theta"]:g} |
| rms_norm_eps | {cfg.rms_norm_eps:g} |
| Weights | float16 safetensors |

## Training

| | |
|---|---|
| Steps | {log.get("total_steps", tc["steps"]):,} |
| Batch | {tc["batch_size"]} sequences of {tc["seq_len"]} tokens (random windows of the concatenated training stream) |
| Tokens seen | {log["tokens_seen"]:,} (about {log["tokens_seen"] / meta["n_bytes_train"]:.2f} epochs) |
| Optimiser | AdamW (betas 0.9, 0.95; weight decay {tc["weight_decay"]} on matrices) |
| Gradient clipping | global norm {tc["grad_clip"]} |
| Learning rate | {schedule} |
| Precision | float32 (weights exported as float16) |
| Seed | {tc["seed"]} |
| Wall time | {log["wall_time_s"] / 60:.1f} minutes |
| Hardware | 2 CPU cores (shared with other jobs during training) |

{widened}{prompt_shaped}The loss curve is in `training_log.json`.

## Results

Evaluated from the float16 checkpoint loaded in float32 over the whole held-out
set ({ev["scored_bytes"]:,} bytes): the held-out token stream is cut into
{ev["n_windows"]:,} consecutive windows of {ev["window"]} tokens, so every byte is
predicted exactly once, from 1 to {ev["window"]} tokens of context. Only byte
targets are scored (BOS/EOS targets excluded). Top-1 agreement is the fraction
of those positions where the argmax of tiny-draft equals the argmax of
tiny-target.

| | |
|---|---|
| Held-out loss, this model | {bpb:.3f} bits per byte |
| Held-out loss, tiny-target | {ev["target_bits_per_byte"]:.3f} bits per byte |
| Held-out loss, tiny-draft | {ev["draft_bits_per_byte"]:.3f} bits per byte |
| Draft/target top-1 agreement | {ev["draft_target_top1_agreement"]:.1%} of held-out positions |

The same numbers are in `eval.json`.

### Greedy completions

{ev["completion_bytes"]} new bytes, greedy, from `[BOS] + prompt`. Greedy decoding of a model
this small soon falls into loops: repeated phrases, identifiers or lines. That
is a useful illustration of why samplers use temperature, top-p and repetition
penalties.

{completions}
"""


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("minibatch/models"))
    p.add_argument("--work-dir", type=Path, default=Path("build/tiny-models"))
    p.add_argument("--models", nargs="*", default=["target", "draft"], choices=list(SPECS))
    p.add_argument("--target-steps", type=int, default=1000)
    p.add_argument("--draft-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--target-lr", type=float, default=2e-3)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--top-level-fraction",
        type=float,
        default=0.0,
        help="fraction of each batch that is [BOS] + the stream from a random top-level line (prompt-shaped)",
    )
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=None, help="cap on held-out windows")
    p.add_argument("--completion-bytes", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", type=int, default=0, help="only time this many steps")
    p.add_argument(
        "--continue-training",
        action="store_true",
        help="start from the exported model in --out and train a further stage",
    )
    p.add_argument(
        "--widen-mlp",
        type=int,
        default=None,
        metavar="SIZE",
        help="with --continue-training: first grow the exported MLP to SIZE hidden units (function-preserving)",
    )
    p.add_argument("--cards-only", action="store_true", help="only re-render README.md from eval.json")
    args = p.parse_args()
    if args.widen_mlp is not None and not args.continue_training:
        p.error("--widen-mlp needs --continue-training")
    return args


def train_config(args: argparse.Namespace, name: str) -> TrainConfig:
    """Hyper-parameters for one model from the command line."""
    return TrainConfig(
        steps=args.target_steps if name == "target" else args.draft_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.target_lr if name == "target" else args.draft_lr,
        min_lr_ratio=0.1,
        warmup_steps=args.warmup_steps,
        weight_decay=0.1,
        grad_clip=1.0,
        seed=args.seed,
        top_level_fraction=args.top_level_fraction,
    )


def evaluate_models(args: argparse.Namespace, corpus: CorpusSplit) -> dict:
    """Evaluate the exported models and write ``eval.json`` next to each."""
    models = {name: load_exported(args.out / f"tiny-{name}") for name in SPECS}
    t0 = time.perf_counter()
    ev = evaluate_pair(models["target"], models["draft"], corpus.heldout, args.seq_len, args.eval_windows)
    ev["eval_time_s"] = round(time.perf_counter() - t0, 1)
    ev["completion_bytes"] = args.completion_bytes
    ev["completions"] = {
        name: {p: greedy_complete(m, p, args.completion_bytes) for p in PROMPTS} for name, m in models.items()
    }
    ev["corpus"] = corpus.metadata
    ev["torch_version"] = torch.__version__
    ev["platform"] = platform.platform()
    for name in SPECS:
        (args.out / f"tiny-{name}" / "eval.json").write_text(json.dumps(ev, indent=1) + "\n")
    return ev


def write_model_cards(out: Path) -> None:
    """Render ``README.md`` for both models from their config, training log and eval.json."""
    for name in SPECS:
        model_dir = out / f"tiny-{name}"
        config = LlamaConfig.from_pretrained(model_dir)
        log = json.loads((model_dir / "training_log.json").read_text())
        ev = json.loads((model_dir / "eval.json").read_text())
        (model_dir / "README.md").write_text(model_card(name, config, log, ev["corpus"], ev))


def main() -> None:
    """Train the requested models, then evaluate and document both."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.cards_only:
        write_model_cards(args.out)
        return
    corpus = load_corpus()
    print(json.dumps(corpus.metadata, indent=1), flush=True)

    widen = args.widen_mlp is not None
    for name in args.models:
        spec = replace(SPECS[name], intermediate_size=args.widen_mlp) if widen else SPECS[name]
        cfg = train_config(args, name)
        out_dir = args.out / f"tiny-{name}"
        init_from = out_dir if args.continue_training else None
        if init_from is not None and not (out_dir / "model.safetensors").is_file():
            raise SystemExit(f"--continue-training needs an exported {out_dir} to start from")
        if args.measure:
            measure_throughput(spec, cfg, corpus.train, args.measure, init_from, widen)
            continue
        prior = json.loads((out_dir / "training_log.json").read_text()) if init_from is not None else None
        stage = 1 + len(prior.get("stages") or [prior]) if prior else 1
        model, log = train_model(spec, cfg, corpus.train, args.work_dir, args.ckpt_every, init_from, stage, widen)
        export_model(model, out_dir, merge_stages(prior, log) if prior else log)
    if args.measure:
        return

    args.out.mkdir(parents=True, exist_ok=True)
    write_heldout_sample(corpus, args.out / "heldout_sample.txt", HELDOUT_SAMPLE_BYTES)
    ev = evaluate_models(args, corpus)
    write_model_cards(args.out)
    summary = {k: v for k, v in ev.items() if k not in ("completions", "corpus")}
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
