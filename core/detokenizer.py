"""Incremental detokenization and stop strings, per sequence, per step.

The engine creates one :class:`OutputText` per sequence and calls
``update(new_token_ids) -> (delta_text, stop_hit)`` after each step, then ``finish()`` once
when the sequence ends for another reason (EOS, stop token, length) to flush held-back text.
"""
from __future__ import annotations

from typing import Sequence

from tokenmill.sampling_params import SamplingParams

# Prompt tokens decoded before the first output token, so that decoders which treat the start
# of a string specially (SentencePiece's leading "▁", byte-level split characters) see context.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas.

    A fast (Rust) tokenizer decodes through its own ``DecodeStream``, which keeps the decoder's
    state between tokens, so a step costs one short call. Other tokenizers decode a short window
    of recent ids each step (vLLM's prefix/read offsets): the text of ``ids[prefix:read]`` is
    already emitted; the delta is what ``ids[prefix:]`` adds to it. Either way an incomplete
    UTF-8 character split across byte-level tokens is held back until a later token completes it
    (or until :meth:`flush`). If the stream fails (it refuses an id), the rest of the sequence is
    decoded whole each step, as ``tokenizer.decode`` would show it.
    With a byte-level BPE tokenizer, ``text`` after ``flush()`` equals
    ``tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``.
    ``spaces_between_special_tokens`` is passed to ``decode`` (only slow, Python tokenizers use it).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        # Context that does not decode cleanly (ends inside a character) would leak into the
        # first delta; decode the output alone then.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)
        self._num_context = len(context)
        self.text = ""
        self._stream, self._backend = _decode_stream(tokenizer, context, skip_special_tokens)
        self._pending = False  # the stream holds ids it has not turned into text yet
        self._whole = False    # the stream failed: decode the whole output each step

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def add(self, token_ids: Sequence[int] | int) -> str:
        """Append ``token_ids`` and return the newly completed text (possibly "")."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self._ids.extend(token_ids)
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, list(token_ids))
            except Exception:  # e.g. an id the vocabulary lacks: decode() shows such ids as it can
                self._stream, self._whole = None, True
                return self._advance_whole(final=False)
            self._pending = piece is None
            if piece:
                self.text += piece
            return piece or ""
        if self._whole:
            return self._advance_whole(final=False)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back (a trailing incomplete character decodes as U+FFFD,
        exactly as a full decode shows it). Call once when the sequence ends."""
        if self._stream is not None:
            return self._advance_whole(final=True) if self._pending else ""
        if self._whole:
            return self._advance_whole(final=True)
        return self._advance(final=True)

    def _advance_whole(self, final: bool) -> str:
        full = self._decode(self.output_token_ids)
        if (full.endswith(_REPLACEMENT) and not final) or not full.startswith(self.text):
            return ""
        delta = full[len(self.text):]
        self.text = full
        return delta

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) and not final:
            return ""  # e.g. a skipped special token: nothing visible yet
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta


def _decode_stream(tokenizer, context: list[int], skip_special_tokens: bool):
    """``(DecodeStream, Rust tokenizer)`` for a fast tokenizer, else ``(None, None)``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None
    try:
        from tokenizers.decoders import DecodeStream
        return DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens), backend
    except (ImportError, TypeError):  # tokenizers before 0.21 has no stream with context
        return None, None


def find_stop(text: str, start: int, stop: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string occurring in ``text`` at index >= ``start`` (ties: the
    longest), as ``(index, stop_string)``, or None."""
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


class OutputText:
    """The text of one output sequence: incremental detokenization plus stop strings.

    ``update(new_token_ids)`` returns ``(delta_text, stop_hit)``. ``delta_text`` is safe to
    stream: it never contains half a character, and without ``include_stop_str_in_output`` the
    last ``len(longest stop) - 1`` characters are held back, so a stop string being generated
    is never sent and then retracted. When a stop string is found (at any position, even across
    tokens), ``stop_hit`` is that string, ``text`` is cut before it (or just after it with
    ``include_stop_str_in_output``) and the sequence must finish. Stop strings are not looked
    for until ``min_tokens`` tokens have been generated (vLLM's rule).
    ``text`` is everything sent so far; after ``finish()`` or a stop hit it is the final text.
    Only for ``params.detokenize``; without it the engine makes no text at all.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        self.stop = params.stop_strings
        self.include_stop = params.include_stop_str_in_output
        self.hold = params.output_text_buffer_length
        self.min_tokens = params.min_tokens
        self._longest = max((len(s) for s in self.stop), default=0)
        self._all = ""        # every decoded character, sent or held back
        self._sent = 0        # how much of _all has been returned
        self.num_tokens = 0
        self.stop_hit: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        return self._all[: self._sent]

    def update(self, new_token_ids: Sequence[int] | int) -> tuple[str, str | None]:
        """Feed this step's new token id(s); return the text to stream and the stop string hit."""
        if self.finished:
            raise RuntimeError("OutputText.update() called after the sequence finished")
        if isinstance(new_token_ids, int):
            new_token_ids = [new_token_ids]
        self.num_tokens += len(new_token_ids)
        return self._take(self.detokenizer.add(new_token_ids), final=False)

    def finish(self) -> str:
        """The sequence ended (EOS, stop token, length): return the held-back rest of the text.
        A stop string completed by the flushed text is still honoured."""
        if self.finished:
            return ""
        delta, _ = self._take(self.detokenizer.flush(), final=True)
        self.finished = True
        return delta

    def _take(self, delta: str, final: bool) -> tuple[str, str | None]:
        before = len(self._all)
        self._all += delta
        if self.stop and delta and self.num_tokens >= self.min_tokens:
            hit = find_stop(self._all, max(0, before - self._longest + 1), self.stop)
            if hit is not None:
                index, s = hit
                self._all = self._all[: index + len(s) if self.include_stop else index]
                self.stop_hit = s
                self.finished = True
                final = True
        end = len(self._all) if final else max(self._sent, len(self._all) - self.hold)
        out = self._all[self._sent:end]
        self._sent = end
        return out, self.stop_hit
