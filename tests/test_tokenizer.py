"""Tokenizers: byte-level round trips, streaming without broken characters, HF files, chat templates."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minibatch.outputs import TextTracker
from minibatch.sampling import SamplingParams
from minibatch.tokenizer import ByteTokenizer, IncrementalDecoder, load_tokenizer, render_chat_template


@given(st.text())
def test_byte_tokenizer_round_trips(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids[0] == 256 and all(0 <= i < 256 for i in ids[1:])
    assert tokenizer.decode(ids) == text


@given(st.text(), st.text(max_size=3))
def test_incremental_decoding_never_emits_a_broken_character(text, prompt):
    tokenizer = ByteTokenizer()
    decoder = IncrementalDecoder(tokenizer, tokenizer.encode(prompt))
    deltas = [decoder.push(token) for token in text.encode("utf-8")]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas) or "\ufffd" in text


def test_invalid_bytes_are_flushed_as_replacement_characters():
    decoder = IncrementalDecoder(ByteTokenizer())
    assert decoder.push(0xE2) == ""  # first byte of a three-byte character
    assert decoder.push(0x82) == ""
    assert decoder.flush() == "\ufffd"


@given(st.text(alphabet="ab\n é€", max_size=40), st.lists(st.text(alphabet="ab\n é€", min_size=1, max_size=4),
                                                          min_size=1, max_size=2))
def test_stop_strings_never_leak_into_the_stream(text, stops):
    tokenizer = ByteTokenizer()
    tracker = TextTracker(tokenizer, SamplingParams(stop=stops), [256])
    streamed, stopped = "", False
    for token in text.encode("utf-8"):
        delta, stopped = tracker.append(token)
        streamed += delta
        if stopped:
            break
    if not stopped:
        streamed += tracker.finish()
    # streaming semantics: the stop string that completes first ends the text, which is
    # cut where the earliest stop string present at that moment begins
    expected = text
    for end in range(1, len(text) + 1):
        starts = [text[:end].find(stop) for stop in stops if stop in text[:end]]
        if starts:
            expected = text[:min(starts)]
            break
    assert streamed == tracker.text == expected
    assert stopped == (expected != text or any(stop in text for stop in stops))
    assert all(stop not in streamed for stop in stops)


def streamed_text(tokenizer, params: SamplingParams, token_ids: list[int]) -> str:
    """The text a completion of ``token_ids`` streams, none of which stops it."""
    tracker = TextTracker(tokenizer, params, [])
    deltas = [tracker.append(token)[0] for token in token_ids]
    return "".join(deltas) + tracker.finish()


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_decides_whether_bos_and_eos_reach_the_text(skip):
    tokenizer = ByteTokenizer()
    ids = [ord("a"), 257, ord("b"), 256, ord("c")]  # EOS and BOS mid-stream (ignore_eos keeps going)
    text = streamed_text(tokenizer, SamplingParams(ignore_eos=True, skip_special_tokens=skip), ids)
    assert text == ("abc" if skip else "a</s>b<s>c")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny BPE tokenizer.json trained with the ``tokenizers`` package."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def fibonacci(n):\n    return n", "import os\nprint('héllo')"] * 10, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory = tmp_path_factory.mktemp("hf")
    tokenizer.save(str(directory / "tokenizer.json"))
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template,
        "added_tokens_decoder": {"1": {"content": "<s>", "special": True}, "2": {"content": "</s>", "special": True}},
    }))
    return directory


def test_hf_tokenizer_round_trips_and_knows_its_specials(hf_dir):
    tokenizer = load_tokenizer(hf_dir)
    ids = tokenizer.encode("def fibonacci(n): héllo")
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.decode(ids) == "def fibonacci(n): héllo"


def test_hf_incremental_decoding_matches_full_decode(hf_dir):
    tokenizer = load_tokenizer(hf_dir)
    ids = tokenizer.encode("import os\nprint('héllo') €", add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.push(t) for t in ids) + decoder.flush()
    assert text == tokenizer.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_hf_skip_special_tokens(hf_dir, skip):
    tokenizer = load_tokenizer(hf_dir)
    words = [tokenizer.encode(word, add_special_tokens=False) for word in ("import os", " print")]
    ids = [*words[0], 2, *words[1]]  # EOS (id 2) between them
    text = streamed_text(tokenizer, SamplingParams(ignore_eos=True, skip_special_tokens=skip), ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("</s>" in text) != skip


def test_chat_template_renders(hf_dir):
    tokenizer = load_tokenizer(hf_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi</s><|assistant|>"


def test_chat_template_raise_exception_becomes_value_error():
    template = "{{ raise_exception('only user messages') }}"
    with pytest.raises(ValueError, match="only user messages"):
        render_chat_template(template, [], True)
