"""LLM: the offline API, shaped like vLLM's (`generate`, `chat`, `get_tokenizer`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from collections.abc import Sequence as Seq

from kvforge.config import EngineConfig
from kvforge.engine.engine import EngineStats, LLMEngine, PromptType
from kvforge.model.tokenizer import Tokenizer
from kvforge.types import RequestOutput, SamplingParams

Message = Mapping[str, str]


class LLM:
    """`LLM(model="smollm2-135m", dtype="float32", block_size=16, kv_cache_memory=..., num_blocks=...,
    max_num_seqs=..., max_num_batched_tokens=..., max_model_len=..., seed=0)`.

    `model` is the alias of the embedded model, a .gguf path or a HF model directory.
    """

    def __init__(self, model: str = "smollm2-135m", **kwargs):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion in one continuous batch; outputs come in prompt order.

        All prompts are validated before any runs: one bad prompt raises ValueError and none is kept.
        """
        if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Seq):
            prompts = [prompts]  # a single prompt; add_request says what is wrong with a bad one
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts; "
                                 f"give one for all or one per prompt")
        return self._run(zip(prompts, params))

    def chat(self, messages: Seq[Message] | Seq[Seq[Message]], sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate a reply."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        if not conversations:
            raise ValueError("chat() needs at least one message")
        tok = self.engine.tokenizer
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(list(conv), add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are produced."""
        [request_id] = self._add([(prompt, sampling_params or SamplingParams())])
        printed = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        text = out.outputs[0].text
                        if len(text) > printed:
                            yield text[printed:]
                            printed = len(text)
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def dump_stats(self) -> str:
        return self.engine.cache.dump_stats()

    def _add(self, requests) -> list[str]:
        ids: list[str] = []
        try:
            for prompt, params in requests:
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, params)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return ids

    def _run(self, requests) -> list[RequestOutput]:
        ids = self._add(requests)
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for request_id in ids:
                if request_id not in final:
                    self.engine.abort_request(request_id)
        return [final[i] for i in ids]
