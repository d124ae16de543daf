import functools
import random

import pytest

from tokenizers.decoders import DecodeStream as RealDecodeStream

from tokenmill.detokenizer import IncrementalDetokenizer, OutputText, find_stop
from tokenmill.sampling_params import SamplingParams

FFFD = "\ufffd"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello tokens!",
    "Café crème brûlée, naïve façade, São Paulo, Zürich, Ærøskøbing, señor, déjà vu.",
    "Tiếng Việt có nhiều dấu: ắ ằ ẳ ẵ ặ.",
    "你好，世界！今天天气很好。我们去公园散步吧。机器学习与自然语言处理。",
    "こんにちは世界。日本語のテキストです。カタカナとひらがな。",
    "Emoji time 😀🎉🚀👍🏽❤️ family 👨‍👩‍👧 flags 🇫🇷🇯🇵 done.",
    "Stop here: ###END### and then more text.",
]


@functools.lru_cache(maxsize=1)
def tokenizer():
    """A byte-level BPE with ~400 tokens: small enough that CJK and emoji split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def encode(text):
    return tokenizer().encode(text, add_special_tokens=False)


class WindowOnly:
    """The tokenizer without its Rust backend, as a slow tokenizer looks: the window path."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


class FailingStream:
    """A DecodeStream that refuses its fourth step: the detokenizer must carry on decoding whole."""

    def __init__(self, **kw):
        self.real, self.steps = RealDecodeStream(**kw), 0

    def step(self, backend, ids):
        self.steps += 1
        if self.steps == 4:
            raise ValueError("refused")
        return self.real.step(backend, ids)


@pytest.fixture(params=["stream", "window", "failing-stream"])
def detok_tok(request, monkeypatch):
    """The test tokenizer as each decoding path of IncrementalDetokenizer sees it."""
    if request.param == "window":
        return WindowOnly(tokenizer())
    if request.param == "failing-stream":
        import tokenizers.decoders
        monkeypatch.setattr(tokenizers.decoders, "DecodeStream", FailingStream)
    return tokenizer()


MULTIBYTE = [
    "Café 你好 😀🚀 naïve 世界",
    "Zürich déjà vu — 今天天气很好 👨‍👩‍👧 🇯🇵!",
    "カタカナとひらがな 🎉🎉 Ærøskøbing",
]


def test_tokenizer_really_splits_characters():
    tok = tokenizer()
    pieces = [tok.decode([i]) for i in encode(MULTIBYTE[0])]
    assert any(FFFD in p for p in pieces)


@pytest.mark.parametrize("text", MULTIBYTE)
@pytest.mark.parametrize("prompt", ["", "Hello 你", "naïve 😀"])
def test_stream_equals_full_decode_at_every_step(text, prompt, detok_tok):
    tok = tokenizer()
    ids = encode(text)
    d = IncrementalDetokenizer(detok_tok, encode(prompt))
    streamed = ""
    for n, i in enumerate(ids, 1):
        delta = d.add(i)
        assert FFFD not in delta
        streamed += delta
        full = tok.decode(ids[:n], skip_special_tokens=True)
        assert streamed == d.text and full.startswith(streamed)
        rest = full[len(streamed):]
        assert rest == "" or rest.endswith(FFFD)  # only an unfinished character is held back
    assert d.flush() == ""
    assert d.text == text == tok.decode(ids)
    assert d.output_token_ids == ids


def test_multi_token_add_and_flush_of_incomplete_char(detok_tok):
    tok = tokenizer()
    ids = encode("ab 😀")
    d = IncrementalDetokenizer(detok_tok, [])
    out = d.add(ids[:2]) + d.add(ids[2:-1])
    assert FFFD not in out
    # the sequence ended inside the emoji: flush shows it as the full decode does
    tail = d.flush()
    assert out + tail == tok.decode(ids[:-1]) and tail.endswith(FFFD)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_full_decode(skip, detok_tok):
    tok = tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
        d = IncrementalDetokenizer(detok_tok, [0, 300, 5], skip_special_tokens=skip)
        for i in ids:
            d.add(i)
        d.flush()
        assert d.text == tok.decode(ids, skip_special_tokens=skip)


def test_skip_special_tokens(detok_tok):
    tok = tokenizer()
    ids = [tok.bos_token_id] + encode("hi 你好") + [tok.eos_token_id] + encode(" ok")
    for skip, expected in [(True, "hi 你好 ok"), (False, "<s>hi 你好</s> ok")]:
        d = IncrementalDetokenizer(detok_tok, [tok.bos_token_id], skip_special_tokens=skip)
        text = "".join(d.add(i) for i in ids) + d.flush()
        assert text == expected == tok.decode(ids, skip_special_tokens=skip)


def stream(text, params, prompt=""):
    """Feed ``text``'s tokens one by one; return (deltas, OutputText) as the engine would."""
    out = OutputText(tokenizer(), encode(prompt), params)
    deltas = []
    for i in encode(text):
        delta, hit = out.update([i])
        deltas.append(delta)
        if hit is not None:
            return deltas, out
    deltas.append(out.finish())
    return deltas, out


def test_stop_string_spanning_tokens_is_cut():
    text = "Café ###END### and then more text."
    stop = "###END###"
    ids = encode(text)
    pieces = [tokenizer().decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)  # it really spans several tokens
    deltas, out = stream(text, SamplingParams(stop=[stop, "never"]))
    assert out.stop_hit == stop and out.finished
    assert out.text == "Café " == "".join(deltas)
    # nothing of the stop string ever went out
    assert all("#" not in d for d in deltas)


def test_stop_string_included():
    deltas, out = stream("Café ###END### and then", SamplingParams(stop="###END###", include_stop_str_in_output=True))
    assert out.stop_hit == "###END###"
    assert out.text == "Café ###END###" == "".join(deltas)


def test_partial_stop_is_held_then_released():
    stop = "###END###"
    text = "a ###EN then 你好 and more"
    out = OutputText(tokenizer(), [], SamplingParams(stop=stop))
    running = ""
    for i in encode(text):
        delta, hit = out.update([i])
        assert hit is None
        running += delta
        decoded = out.detokenizer.text  # everything decoded so far, sent or not
        assert decoded.startswith(running)
        # exactly len(stop) - 1 characters are held back, so "###EN" is not sent until it
        # can no longer become "###END###"
        assert len(decoded) - len(running) == min(len(stop) - 1, len(decoded))
    tail = out.finish()
    assert tail != "" and running + tail == out.text == text


def test_window_stays_small():
    counting = Counting(tokenizer())
    ids = encode(" ".join(MULTIBYTE * 10))
    d = IncrementalDetokenizer(counting, encode("prompt 你好"))
    for i in ids:
        d.add(i)
    d.flush()
    assert d.text == tokenizer().decode(ids) and len(ids) > 200
    assert counting.longest <= 12


class Counting:
    """Counts ``decode`` calls; exposes the Rust backend when ``fast`` (the stream path)."""

    def __init__(self, tok, fast=False):
        self.tok, self.longest, self.calls = tok, 0, 0
        if fast:
            self.backend_tokenizer = tok.backend_tokenizer

    def decode(self, ids, **kw):
        self.calls += 1
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, **kw)


def test_fast_tokenizer_streams_without_decoding_each_step():
    counting = Counting(tokenizer(), fast=True)
    ids = encode(" ".join(MULTIBYTE * 3))
    d = IncrementalDetokenizer(counting, encode("prompt 你好"))
    text = "".join(d.add(i) for i in ids)
    assert counting.calls == 1  # the prompt context's check, nothing per step
    text += d.flush()
    assert text == d.text == tokenizer().decode(ids) and counting.calls == 1  # nothing was held back
    d = IncrementalDetokenizer(counting, [])
    d.add(encode("ab 😀")[:-1])
    assert d.flush().endswith(FFFD) and counting.calls == 2  # held back: flush decodes once


def test_failing_stream_carries_on_with_whole_decodes(monkeypatch):
    import tokenizers.decoders
    made = []
    monkeypatch.setattr(tokenizers.decoders, "DecodeStream", lambda **kw: made.append(FailingStream(**kw)) or made[-1])
    ids = encode(MULTIBYTE[1])
    d = IncrementalDetokenizer(tokenizer(), encode("naïve 😀"))
    deltas = [d.add(i) for i in ids]
    assert made and made[0].steps == 4  # it failed on the fourth token and was not called again
    assert all(FFFD not in x for x in deltas) and "".join(deltas) + d.flush() == MULTIBYTE[1] == d.text


def test_earliest_stop_wins_and_find_stop():
    assert find_stop("xx abc def", 0, ["def", "abc"]) == (3, "abc")
    assert find_stop("xx abcd", 0, ["abc", "abcd"]) == (3, "abcd")
    assert find_stop("abc", 1, ["abc"]) is None
    deltas, out = stream("one two three four", SamplingParams(stop=["four", "two"]))
    assert out.stop_hit == "two" and out.text == "one "


def test_stop_ignored_before_min_tokens():
    text = "ab ab ab ab ab ab ab ab"
    n_first = len(encode("ab"))
    params = SamplingParams(stop="ab", min_tokens=n_first + 3, max_tokens=50)
    deltas, out = stream(text, params)
    assert out.stop_hit == "ab"
    assert len(out.text) > 2 and text.startswith(out.text) and text[len(out.text):].startswith("ab")


def test_stream_without_stop_has_no_holdback_and_equals_decode():
    text = MULTIBYTE[1]
    deltas, out = stream(text, SamplingParams())
    assert "".join(deltas) == out.text == text
    assert deltas[-1] == ""  # nothing was held back for finish()
    assert all(FFFD not in d for d in deltas)
    with pytest.raises(RuntimeError):
        out.update([5])
