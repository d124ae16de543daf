"""Per-request sampling settings, with vLLM's field names, defaults and validation."""
from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

from tokenmill.guided.params import StructuredOutputsParams

#: How a pooling (embedding) request reduces the prompt's hidden states to one vector.
POOLING_TYPES = ("last", "mean")

# Below this temperature a request is decoded greedily (as vLLM does).
_GREEDY_EPS = 1e-5


def _parse_logit_bias(bias) -> dict[int, float]:
    """``{token id: bias}`` from JSON's ``{"123": 5}``; a key that is not a token id is named."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}.")
    out = {}
    for k, v in bias.items():
        try:
            tid = k if isinstance(k, int) and not isinstance(k, bool) else int(str(k).strip(), 10)
        except ValueError:
            raise ValueError(f"logit_bias key {str(k)[:64]!r} is not a token id (keys must be integer "
                             f"token ids, as strings in JSON).") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ValueError(f"logit_bias value for token {tid} must be a number, got {v!r}.")
        out[tid] = min(100.0, max(-100.0, float(v)))
    return out


class SamplingType(enum.IntEnum):
    """How the sampler picks a row's token: argmax, a draw from the shared generator, or a
    draw from the request's own seeded generator."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """How to sample one request's completion.

    Field names, meanings and defaults follow ``vllm.SamplingParams``:

    - ``n``: completions per prompt. With a ``seed``, completion ``i`` uses ``seed + i``
      (see :meth:`for_child`).
    - penalties: ``presence_penalty`` / ``frequency_penalty`` in [-2, 2] (OpenAI definition,
      over generated tokens); ``repetition_penalty`` > 0 (HF/CTRL definition, over prompt and
      generated tokens; 1 = off).
    - ``temperature`` >= 0 (below 1e-5: greedy); ``top_p`` in (0, 1]; ``top_k``: 0 or -1 =
      off (-1 is normalised to 0); ``min_p`` in [0, 1].
    - ``seed``: per-request generator, so the same seed gives the same text whatever else is
      in the batch.
    - ``stop`` (strings), ``stop_token_ids``, ``include_stop_str_in_output``, ``ignore_eos``.
    - ``max_tokens`` >= 0 or None (= up to the context length); 0 only scores the prompt
      (``prompt_logprobs``/echo). ``min_tokens`` <= ``max_tokens``: EOS and stop tokens are
      blocked and stop strings ignored until that many tokens are generated.
    - ``logprobs``: number of top logprobs to return besides the sampled token (0 = only the
      sampled token's); ``prompt_logprobs`` likewise for prompt tokens. Logprobs are of the raw
      model distribution (before penalties, bias and temperature).
    - ``logit_bias``: token id -> bias added to the logit, clamped to [-100, 100] (OpenAI);
      keys may be strings holding ints, as JSON sends them.
    - ``skip_special_tokens``, ``spaces_between_special_tokens``, ``detokenize``: detokenizer.
    - ``structured_outputs``: a :class:`~tokenmill.guided.params.StructuredOutputsParams` (or a
      dict of its fields) constraining the output to a JSON schema, regex, choice, grammar, any
      JSON object or structural tag; the sequence ends when the grammar does.
    - ``pooling``: ``"last"`` or ``"mean"`` makes the request an embedding: the engine returns the
      prompt's final-norm hidden state at its last token, or averaged over its tokens
      (``RequestOutput.pooled``), instead of generating; needs ``max_tokens=0`` and ``n=1``. Such a
      request neither reads nor fills the prefix cache, and frees its blocks when done.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    pooling: str | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.stop is None:
            self._stop_list = []
        elif isinstance(self.stop, str):
            self._stop_list = [self.stop]
        else:
            self._stop_list = list(self.stop)
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = _parse_logit_bias(self.logit_bias)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a dict, "
                             f"got {type(self.structured_outputs).__name__}")
        self._verify()

    def _verify(self) -> None:
        def bad(name: str, requirement: str):
            raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)!r}.")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "an integer >= 1")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "greater than zero")
        if not self.temperature >= 0.0:
            bad("temperature", "non-negative")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "0 or -1 (disabled), or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "in [0, 1]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            bad("max_tokens", "None or an integer >= 0")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs < 0:
            bad("logprobs", "None or >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            bad("prompt_logprobs", "None or >= 0")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63):
            bad("seed", "None or a 64-bit signed integer")
        if any(not isinstance(s, str) or s == "" for s in self._stop_list):
            bad("stop", "a non-empty string or a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "non-negative token ids")
        if self.pooling is not None:
            if self.pooling not in POOLING_TYPES:
                bad("pooling", f"None or one of {', '.join(POOLING_TYPES)}")
            if self.max_tokens != 0 or self.n != 1:
                raise ValueError(f"pooling requests generate nothing: they need max_tokens=0 and n=1, "
                                 f"got max_tokens={self.max_tokens}, n={self.n}.")
        if self._stop_list and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True.")

    def verify_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id named in these params is outside ``[0, vocab_size)``;
        the engine calls it when a request arrives, before any step can index with it."""
        bias_ids = list(self.logit_bias or ())
        bad = [t for t in bias_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"logit_bias has token id(s) {bad} out of vocabulary (size {vocab_size}).")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids has token id(s) {bad} out of vocabulary (size {vocab_size}).")

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (empty when None)."""
        return self._stop_list

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def output_text_buffer_length(self) -> int:
        """Characters the streamer holds back so that a partly generated stop string is never
        sent and then retracted. With ``include_stop_str_in_output`` everything sent is part of
        the final text anyway, so nothing is held back."""
        if self._stop_list and not self.include_stop_str_in_output:
            return max(len(s) for s in self._stop_list) - 1
        return 0

    def all_stop_token_ids(self, eos_token_id: int | list[int] | None) -> set[int]:
        """Token ids that end the sequence: ``stop_token_ids`` plus EOS unless ``ignore_eos``."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos and eos_token_id is not None:
            ids.update([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        return ids

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    def for_child(self, index: int) -> SamplingParams:
        """Params for completion ``index`` of an ``n > 1`` request: n=1 and, if seeded,
        ``seed + index`` (vLLM's rule), so the n completions differ yet are reproducible."""
        child = self.clone()
        child.n = 1
        if self.seed is not None:
            child.seed = self.seed + index
        return child
