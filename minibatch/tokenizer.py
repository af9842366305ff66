"""Tokenizers: the protocol the engine needs, a byte-level one, and Hugging Face's.

The engine never looks inside a tokenizer: it needs ``encode``, ``decode``, the EOS ids,
and an :class:`IncrementalDecoder` that turns a growing list of token ids into text
deltas for streaming without ever emitting half of a UTF-8 character.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

BYTE_VOCAB_SIZE = 258
BYTE_BOS_ID = 256
BYTE_EOS_ID = 257


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    special_token_ids: frozenset[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer of the embedded models: ids 0–255 are bytes, 256 is BOS
    ``<s>``, 257 is EOS ``</s>``. Any text encodes; any id list decodes (invalid UTF-8
    becomes U+FFFD). A model whose config.json names other BOS/EOS ids (e.g. a random
    test checkpoint) passes them in; ids >= 256 never decode to text."""

    def __init__(self, bos_token_id: int | None = BYTE_BOS_ID, eos_token_ids: tuple[int, ...] = (BYTE_EOS_ID,),
                 vocab_size: int = BYTE_VOCAB_SIZE):
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.special_token_ids = frozenset(t for t in (bos_token_id, *eos_token_ids) if t is not None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes of ``text``, with BOS first when ``add_special_tokens``."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens and self.bos_token_id is not None else ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; special ids are dropped (or shown as ``<s>``/``</s>``)."""
        out = bytearray()
        for token in token_ids:
            if token in self.special_token_ids:
                if not skip_special_tokens:
                    out += b"<s>" if token == self.bos_token_id else b"</s>"
            elif token < 256:
                out.append(token)
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` package (extra ``hf``)."""

    def __init__(self, model_dir: str | Path, eos_token_ids: tuple[int, ...] = ()):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ImportError("this model ships a tokenizer.json; install the 'hf' extra: "
                              "pip install 'minibatch[hf]'") from None
        model_dir = Path(model_dir)
        self._tokenizer = RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.config = _read_json(model_dir / "tokenizer_config.json")
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = self._tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        eos = set(eos_token_ids)
        if self.eos_token and self._tokenizer.token_to_id(self.eos_token) is not None:
            eos.add(self._tokenizer.token_to_id(self.eos_token))
        self.eos_token_ids = tuple(sorted(eos))
        added = self.config.get("added_tokens_decoder", {})
        self.special_token_ids = frozenset(int(i) for i, t in added.items() if t.get("special"))
        self.chat_template = self.config.get("chat_template")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's jinja2 chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template in tokenizer_config.json; "
                             "pass a plain prompt to generate() instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def render_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                         **special_tokens: str) -> str:
    """Render a Hugging Face chat template in a sandboxed jinja2 environment."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'minibatch[hf]'") from None

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special_tokens)


class IncrementalDecoder:
    """Turns a growing token list into text deltas, never splitting a UTF-8 character.

    Decodes a short window ending at the newest token and emits only text that is
    complete: a window whose decoding ends in U+FFFD (an unfinished byte sequence)
    waits for the next token. ``flush`` emits whatever is left at the end. Special tokens
    (BOS, EOS, a chat template's markers) stay out of the text unless
    ``skip_special_tokens=False``.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_ids or [])[-6:]  # a little context for spacing
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (possibly empty)."""
        self.token_ids.append(token_id)
        prefix, full = self._decode(self.read_offset), self._decode(len(self.token_ids))
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Text still held back (an unfinished character becomes U+FFFD)."""
        prefix, full = self._decode(self.read_offset), self._decode(len(self.token_ids))
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full[len(prefix):]

    def _decode(self, end: int) -> str:
        """Text of the window's tokens from ``prefix_offset`` up to ``end``."""
        return self.tokenizer.decode(self.token_ids[self.prefix_offset:end], self.skip_special_tokens)


def load_tokenizer(model_dir: str | Path, bos_token_id: int | None = None, eos_token_ids: tuple[int, ...] = (),
                   vocab_size: int = BYTE_VOCAB_SIZE) -> Tokenizer:
    """The tokenizer of a model directory: ``tokenizer.json`` if present, else bytes.

    The ids come from the model's config.json; a byte-level model without them uses
    BOS 256 and EOS 257.
    """
    if (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(model_dir, eos_token_ids)
    bos = BYTE_BOS_ID if bos_token_id is None else bos_token_id
    return ByteTokenizer(bos, eos_token_ids or (BYTE_EOS_ID,), vocab_size)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
