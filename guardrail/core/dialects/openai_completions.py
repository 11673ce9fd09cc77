"""OpenAI legacy completions (``POST /v1/completions``): chat's stream with ``choices[].text``.

vLLM and many OpenAI-compatible servers still serve it. Each choice's ``text`` is its channel;
everything else (finish reasons that wait, logprobs dropped once a choice's text changes,
endings with ``finish_reason: "content_filter"`` and ``[DONE]``) is as in chat completions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mypy_extensions import mypyc_attr

from guardrail.core import jsontext
from guardrail.core.dialect import Framing, RequestInfo
from guardrail.core.dialects import _openai
from guardrail.core.dialects.openai_chat import ChatStream
from guardrail.core.sse import encode_event

NAME = "openai_completions"


@mypyc_attr(allow_interpreted_subclasses=True)
class OpenAICompletions:
    """The legacy completions dialect."""

    name = NAME

    def start(self, framing: Framing, request: RequestInfo | None = None, **options: Any) -> CompletionsStream:
        payload = (request.payload if request is not None else None) or {}
        options.setdefault("include_usage", _openai.include_usage(payload))
        return CompletionsStream(framing, **options)

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        return _openai.status_error_body(status, code, message, param)

    def prompt_tokens(self, payload: Mapping[str, Any], count: Callable[[str], int]) -> int:
        prompt = payload.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else [p for p in prompt or () if isinstance(p, str)]
        return sum(count(text) for text in texts)


DIALECT = OpenAICompletions()


@mypyc_attr(allow_interpreted_subclasses=True)
class CompletionsStream(ChatStream):
    """One legacy completion: chunks whose choices carry ``text``."""

    dialect_name = NAME
    answer_field = "text"
    chunk_object = "text_completion"

    def text(self, channel: str, text: str) -> bytes:
        choice = int(channel[len("choices[") : channel.index("]")])
        chunk = {**self.template, "choices": [{"index": choice, "text": text, "logprobs": None, "finish_reason": None}]}
        return encode_event(jsontext.dumps(chunk))

    def _spelled(self, choice: dict[str, Any]) -> bool:
        """Whether a choice's logprobs ``tokens`` join to exactly its ``text`` in this chunk."""
        logprobs, text = choice.get("logprobs"), choice.get("text")
        tokens = logprobs.get("tokens") if type(logprobs) is dict else None
        if type(tokens) is not list or not all(type(token) is str for token in tokens):
            return False
        return "".join(tokens) == (text if type(text) is str else "")

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        # Completions choices have no delta: the text (empty on a finish) is the choice's own.
        choice = {key: value for key, value in choice.items() if key != "delta"}
        choice.setdefault("text", "")
        return super()._chunk(choice)
