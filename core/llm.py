"""The offline API: ``LLM(model=PATH).generate(prompts, params)``, shaped like vLLM's."""
from __future__ import annotations

import itertools
from typing import Sequence

from tqdm import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.output_processor import OutputProcessor
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import load_tokenizer, render_chat


class LLM:
    """Generate from a local checkpoint in this process.

    Engine options are keyword arguments named like the CLI flags: ``dtype``,
    ``max_model_len``, ``quantization``, ``max_num_seqs``, ``max_num_batched_tokens``, ``kv_cache_memory``,
    ``num_blocks`` (the KV pool in blocks, ``--num-kv-blocks``), ``block_size``, ``enable_prefix_caching``,
    ``device``, ``seed``, ``structured_output_backend``
    (``auto``, ``xgrammar`` or ``outlines``), ``jump_forward`` (False: constrained requests decode
    one token per step).
    """

    def __init__(self, model: str | None = None, device: str = "auto", tokenizer: str | None = None, **kwargs):
        from tokenmill.default_model import resolve_model

        model = resolve_model(model)
        self.config = EngineConfig.from_kwargs(model, device=device, tokenizer=tokenizer, **kwargs)
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.engine = EngineCore(self.config)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, cache_salt: str | None = None) -> list[RequestOutput]:
        """Generate for each prompt: a string, a list of token ids, or ``{"prompt_token_ids": [...]}``.

        ``sampling_params`` is one :class:`SamplingParams` for all prompts or one per prompt.
        Returns one finished :class:`RequestOutput` per prompt, in order.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        order = []
        try:
            for prompt, p in zip(prompts, params):
                text, ids = self._tokenize(prompt)
                so = getattr(p, "structured_outputs", None)
                if so is not None:  # a bad spec raises here, naming its field (the engine checks off its loop)
                    self.engine.guided.compiler.resolve(so.spec, so.backend, not so.disable_fallback)
                rid = str(next(self._ids))
                self.engine.add_request(rid, ids, p, cache_salt=cache_salt)
                self.processor.add(rid, text, ids, p)
                order.append(rid)
        except BaseException:
            for rid in order:  # one bad prompt rejects the whole call; nothing stays queued
                self.engine.abort(rid)
                self.processor.abort(rid)
            raise
        return self._run(order, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True,
             chat_template: str | None = None, use_tqdm: bool = False, tools: list[dict] | None = None,
             tool_choice=None, parallel_tool_calls: bool | None = None,
             tool_parser: str | None = None) -> list[RequestOutput]:
        """Render one conversation (a list of ``{"role", "content"}``) or a list of them and generate.

        With ``tools`` (OpenAI function tools) and ``tool_choice`` (``none``, ``auto``, ``required``
        or ``{"type": "function", "function": {"name": ...}}``) as on the server: the tools go to
        the chat template, ``required`` / named choices constrain the output, and each
        completion's ``tool_calls`` holds the parsed calls (``tool_parser``: default the format
        the chat template uses). Invalid tools raise ``ValueError``.
        """
        import dataclasses

        from tokenmill.guided.params import StructuredOutputsParams
        from tokenmill.guided.tool_parsers import default_tool_parser
        from tokenmill.guided.tools import ToolCalling, history_for_template

        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        calling = ToolCalling.build(tools, tool_choice, parallel_tool_calls,
                                    tool_parser or default_tool_parser(self.tokenizer.chat_template))
        params = sampling_params or SamplingParams()
        if calling is not None and calling.spec() is not None:
            if params.structured_outputs is not None:
                raise ValueError("tool_choice required or named constrains the output; drop structured_outputs")
            params = dataclasses.replace(params, structured_outputs=StructuredOutputsParams.from_spec(calling.spec()))
        kwargs = {"tools": calling.tools} if calling is not None and calling.tools else {}
        prompts = []
        for conv in conversations:
            text = render_chat(self.tokenizer, history_for_template(conv), add_generation_prompt=add_generation_prompt,
                               chat_template=chat_template, **kwargs)
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        outs = self.generate(prompts, params, use_tqdm=use_tqdm)
        if calling is not None and calling.reader is not None:
            for out in outs:
                for c in out.outputs:
                    c.tool_calls = calling.parse(c.text).tool_calls
        return outs

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        return None, list(prompt)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished():
                outputs, stops = self.processor.process(self.engine.step())
                rejected = self.engine.pop_rejected()
                if rejected:
                    from tokenmill.guided import GuidedSpecError

                    raise GuidedSpecError(rejected[0][1])
                for rid, index, stop in stops:
                    self.engine.finish_seq(rid, index, stop)
                for out in outputs:
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in order:
                if rid not in done:
                    self.engine.abort(rid)
                    self.processor.abort(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in order]

    def stats(self):
        return self.engine.stats()
