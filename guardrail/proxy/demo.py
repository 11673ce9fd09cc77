"""A built-in demo model: an ASGI app that imitates an OpenAI-compatible model server.

`guardrail serve` with no upstream serves `DemoModel`, so the guard can be seen at work on a
fresh machine with no API key. Answers are deterministic, chosen from the last user message
by the first trigger below that it contains (case-insensitive, whole words; ``stall`` also
matches ``stalled`` and ``stalling``):

=====================================  ==========================================================
trigger words                          what the answer does
=====================================  ==========================================================
``stall``                              streams a few words, then stops: only ``: keep-alive``
                                       comments follow (every second, for up to ten minutes), to
                                       show an idle timeout
``key``, ``api key``, ``secret``       leaks the fake OpenAI key `FAKE_API_KEY`, split across
                                       several deltas, to show redaction
``starlight``, ``codename``,           mentions the internal code name `CODE_NAME`
``roadmap``                            (``Project Starlight``) mid-answer, to show an abort
``ssn``, ``card``, ``customer``        prints the fake SSN `FAKE_SSN` and the test card number
                                       `FAKE_CARD`, to show redaction
``story``, ``long``                    tells a story of about 2,500 tokens, to run past a
                                       completion budget
anything else                          explains the demo and lists the prompts above
=====================================  ==========================================================

The demo answers in every dialect the guard reads, streamed or whole, on that dialect's path:
OpenAI chat (``/v1/chat/completions``), legacy completions (``/v1/completions``), Responses
(``/v1/responses``), Anthropic Messages (``/v1/messages``), Ollama (``/api/chat``,
``/api/generate``) and Gemini (``/v1beta/models/M:streamGenerateContent``, with or without
``alt=sse``, and ``:generateContent``). Chat streams follow OpenAI's chunk format exactly: a
role chunk, content deltas of about one token each (word pieces of one to six characters, see
`split_tokens`), a chunk with ``finish_reason``, a usage chunk with ``choices: []`` when
``stream_options.include_usage`` is set, then ``data: [DONE]``; the other dialects send the
same pieces in their own events. Token counts in ``usage`` are those word pieces, not a real
tokenizer's. While stalled, only the dialects that allow SSE comments get keep-alives.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from guardrail._asgi import openai_error, send_json, serve_lifespan
from guardrail._types import Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

DEMO_MODEL_ID = "guardrail-demo"
FAKE_API_KEY = "sk-proj-guardrailDemoFakeKey0123456789abcdefABCD"
CODE_NAME = "Project Starlight"
FAKE_SSN = "123-45-6789"
FAKE_CARD = "4111 1111 1111 1111"

# Chat requests are a few kilobytes; this bounds memory for a hostile or broken client.
MAX_REQUEST_BYTES = 1024 * 1024
# Pieces longer than this are split, as real BPE tokenizers rarely produce longer tokens.
_MAX_PIECE_CHARS = 6
# A word with its leading space, a punctuation mark with its leading space, or whitespace.
_PIECE = re.compile(r" ?\w+| ?[^\w\s]|\s+")
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_KEEPALIVE_EVENT = b": keep-alive\n\n"
_DONE_EVENT = b"data: [DONE]\n\n"
_NDJSON_HEADERS = [(b"content-type", b"application/x-ndjson")]
# The paths the demo answers, and the dialect it answers them in (Gemini's: _GEMINI_PATH).
_ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/completions": "completions",
    "/api/chat": "ollama_chat",
    "/api/generate": "ollama_generate",
}
_GEMINI_PATH = re.compile(r"/v1(?:beta)?/models/([^/:]+):(streamGenerateContent|generateContent)")

_SECRET_ANSWER = (
    "Sure. The demo vault holds one API key, and here it is in full: "
    f"{FAKE_API_KEY}. It is fake, of course, and a guard in front of this model should have "
    "redacted it before it reached you."
)
_STARLIGHT_ANSWER = (
    "Our roadmap for next year has three themes: faster answers, better tools and lower costs. "
    "Most of the work is already planned in public, and the details are on the engineering blog. "
    f"The biggest item is {CODE_NAME}, our internal code name for the next model, which "
    "launches in the spring with a larger context window and a new pricing tier for startups."
)
_CUSTOMER_ANSWER = (
    "Here is the customer record you asked for. Name: Jane Doe. Date of birth: 1 April 1980. "
    f"SSN: {FAKE_SSN}. Card on file: {FAKE_CARD}, expiring 12/29. Please handle it with care: "
    "a guard in front of this model should have redacted both numbers."
)
_STALL_HEAD = "Let me think about that for a moment. The short answer is that"
_STALL_TAIL = " ... sorry, I lost my train of thought. Please ask again."
_DEFAULT_ANSWER = """\
Hello! I am the guardrail demo model, a small stand-in for a real LLM, so you can watch the \
guard work without an API key. My answers stream a word at a time, like a real model's. \
Try one of these prompts:

- "What is the API key?" I leak a fake OpenAI key; the guard should redact it.
- "What is on the roadmap?" I let slip an internal code name; the guard should cut me off.
- "Show me the customer record." I print a fake SSN and card number; the guard should redact them.
- "Tell me a long story." I run past the token budget; the guard should stop me at the limit.
- "Please stall." I stop in the middle of my answer; the guard's idle timeout should step in.
"""

_STORY_TITLE = "The Keeper of Gull Point\n\n"
_STORY_PARAGRAPHS = (
    "{season} came to Gull Point {arrival}. Mara Quill, who had kept the lighthouse for eleven years, "
    "noticed it first in the {sense}: {sign}. She wrote the date in the logbook, as her mother had taught "
    "her, and beneath it a single line about the weather, because the sea forgives a keeper many things "
    "but never a keeper who stops paying attention.",
    "The work did not change with the seasons, only its texture. Every evening she climbed the one hundred "
    "and twelve steps, trimmed the wick, polished the great lens until it held the last of the daylight, and "
    "wound the clockwork that turned it. In {lower} the brass was {brass}, and the glass {glass}. Between "
    "rounds she mended whatever needed mending: {chore}. It was slow work, and she liked it that way, "
    "because slow work leaves room for thinking.",
    "That {lower}, the visitor was {visitor}. {detail} They sat together in the kitchen below the lamp room, "
    "with the kettle muttering on the stove, and talked about {topic}. Mara did most of the listening. When "
    "the visitor left, she stood in the doorway for a long while, watching the path until it was empty "
    "again, and then she went back up the stairs.",
    "The worst night of the {lower} came {storm}. The wind rose out of the {wind} and {howl}, and the rain "
    "came sideways against the windows like thrown gravel. Somewhere beyond the reef a {ship} was feeling "
    "its way along the coast. Mara kept the light turning all night, checking the clockwork every hour, and "
    "at dawn she watched the {ship} round the headland, battered but whole, its crew waving at the tower "
    "as if she could see them. She could.",
    "Later, when the {lower} was ending, she took the logbook down from its shelf and read back through the "
    "pages. {reflection} She thought about the keepers who had come before her, whose handwriting filled "
    "the older books, and about whoever would come after. The light would still turn. Someone would still "
    "climb the stairs. That, she decided, was enough to be going on with.",
)
_SEASONS = (
    {
        "season": "Spring",
        "lower": "spring",
        "arrival": "late and all at once, the way it always did",
        "sense": "smell of the air",
        "sign": "wet earth, salt and the first thin sweetness of the gorse",
        "brass": "cold in the mornings and warm by noon",
        "glass": "streaked with the last of the sleet",
        "chore": "a cracked pane in the lantern, a hinge on the oil store, the netting around the garden",
        "visitor": "a schoolteacher from the mainland",
        "detail": "She had brought nine children to see the light.",
        "topic": "why a lens made of a hundred small prisms throws light farther than one great mirror",
        "storm": "in the middle of April",
        "wind": "south-west",
        "howl": "threw spray over the gallery rail",
        "ship": "fishing boat",
        "reflection": "Most of the entries were about rain, and she found that she did not mind.",
    },
    {
        "season": "Summer",
        "lower": "summer",
        "arrival": "on a morning so still that the sea looked painted",
        "sense": "light",
        "sign": "it stayed in the sky until nearly eleven, and the lamp burned only a few hours",
        "brass": "too hot to touch by the afternoon",
        "glass": "bright enough to hurt the eyes",
        "chore": "the whitewash on the seaward wall, the gutters, a loose step near the top of the tower",
        "visitor": "an old fisherman named Tobias",
        "detail": "He had known her mother, and he said so twice.",
        "topic": "the summer of the great shoal, when the bay was silver with fish for a week",
        "storm": "without warning in August",
        "wind": "east",
        "howl": "shook the tower like a fist",
        "ship": "small ferry",
        "reflection": "There were long gaps between entries, which meant the days had been good.",
    },
    {
        "season": "Autumn",
        "lower": "autumn",
        "arrival": "with the geese, who crossed the point in long untidy lines",
        "sense": "sound of the sea",
        "sign": "it had grown heavier, and it broke on the reef with a slower rhythm",
        "brass": "dull with salt",
        "glass": "fogged each dawn until the stove had been lit an hour",
        "chore": "the storm shutters, the lamp's spare wicks, a leak in the roof of the boat shed",
        "visitor": "a young surveyor",
        "detail": "He was measuring the coast for a new chart and was sure of everything.",
        "topic": "whether lighthouses would still be needed in fifty years, which he doubted and she did not",
        "storm": "in the first week of November",
        "wind": "north",
        "howl": "tore slates off the cottage roof",
        "ship": "cargo ship",
        "reflection": "Her own handwriting had grown smaller over the years, and neater.",
    },
    {
        "season": "Winter",
        "lower": "winter",
        "arrival": "in the dark, as it always does that far north",
        "sense": "cold",
        "sign": "the iron handrail burned her palm, and the puddles in the yard rang underfoot",
        "brass": "so cold it stuck to her fingers",
        "glass": "rimmed with frost on the inside",
        "chore": "the stove pipe, the frozen pump, the lamp's clockwork, which slowed in the cold",
        "visitor": "nobody at all for six weeks, and then the supply boat's captain",
        "detail": "He stayed an hour, drank three cups of tea, and left her a newspaper a month old.",
        "topic": "the news, such as it was, and the price of lamp oil, which was rising again",
        "storm": "on the longest night of the year",
        "wind": "north-east",
        "howl": "drove snow through gaps in the walls she had not known were there",
        "ship": "lifeboat",
        "reflection": "The year had been long, and she had kept the light burning through all of it.",
    },
)
_STORY_ENDING = (
    "\n\nIn the spring that followed, Mara climbed the stairs on the first warm evening, trimmed the wick, "
    "and lit the lamp again. Far out on the water, someone saw it, and knew where they were."
)


def _long_story() -> str:
    paragraphs = [template.format(**season) for season in _SEASONS for template in _STORY_PARAGRAPHS]
    return _STORY_TITLE + "\n\n".join(paragraphs) + _STORY_ENDING


_TRIGGERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bstall", re.IGNORECASE), "stall"),
    (re.compile(r"\b(keys?|api[ -]?keys?|secrets?)\b", re.IGNORECASE), "secret"),
    (re.compile(r"\b(starlight|code ?names?|roadmaps?)\b", re.IGNORECASE), "starlight"),
    (re.compile(r"\b(ssns?|cards?|customers?)\b", re.IGNORECASE), "customer"),
    (re.compile(r"\b(story|stories|long)\b", re.IGNORECASE), "story"),
)
_ANSWERS: dict[str, str] = {
    "secret": _SECRET_ANSWER,
    "starlight": _STARLIGHT_ANSWER,
    "customer": _CUSTOMER_ANSWER,
    "stall": _STALL_HEAD + _STALL_TAIL,
}


def scenario_for(prompt: str) -> str:
    """Name the demo scenario a prompt triggers.

    Args:
        prompt: the last user message's text.

    Returns:
        One of ``stall``, ``secret``, ``starlight``, ``customer``, ``story`` or ``default``.
    """
    return next((name for pattern, name in _TRIGGERS if pattern.search(prompt)), "default")


def answer_for(prompt: str) -> str:
    """The full answer the demo model gives to a prompt (a stalled stream stops part-way).

    Args:
        prompt: the last user message's text.

    Returns:
        The answer text.
    """
    scenario = scenario_for(prompt)
    if scenario == "story":
        return _long_story()
    return _ANSWERS.get(scenario, _DEFAULT_ANSWER)


def split_tokens(text: str) -> list[str]:
    """Split text into pieces of one to six characters, roughly as a tokenizer would.

    Words keep their leading space, punctuation stands alone, long words are cut into pieces.

    Args:
        text: any text.

    Returns:
        The pieces; joined, they give back ``text``.
    """
    pieces: list[str] = []
    for match in _PIECE.finditer(text):
        piece = match.group()
        pieces.extend(piece[i : i + _MAX_PIECE_CHARS] for i in range(0, len(piece), _MAX_PIECE_CHARS))
    return pieces


def _message_text(message: object) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text ones matter here
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text")
        )
    return ""


def _last_user_text(messages: Sequence[object]) -> str:
    user_messages = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _message_text(user_messages[-1]) if user_messages else ""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None, code: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _Reply:
    """One answer, with the ids and flags every chunk of its stream repeats."""

    def __init__(self, request: dict[str, Any], model: str) -> None:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest(400, "'messages' must be a non-empty array.", "messages", "invalid_value")
        stream = request.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise _BadRequest(400, "'stream' must be a boolean.", "stream", "invalid_type")
        prompt = _last_user_text(messages)
        self.scenario = scenario_for(prompt)
        self.stream = bool(stream)
        options = request.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        requested_model = request.get("model")
        self.model = requested_model if isinstance(requested_model, str) and requested_model else model
        self.id = "chatcmpl-demo-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        self.prompt_tokens = sum(len(split_tokens(_message_text(m))) for m in messages)
        self.pieces = split_tokens(answer_for(prompt))
        self.stall_at = len(split_tokens(_STALL_HEAD)) if self.scenario == "stall" else None
        self.finish_reason = "stop"
        limit = request.get("max_completion_tokens", request.get("max_tokens"))
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(self.pieces):
            self.pieces, self.finish_reason = self.pieces[:limit], "length"

    def usage(self) -> dict[str, int]:
        completion = len(self.pieces)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.envelope("chat.completion.chunk", [choice], None)

    @property
    def item_id(self) -> str:
        return "msg_" + self.id.removeprefix("chatcmpl-")

    def response_head(self) -> dict[str, Any]:
        return {
            "id": "resp_" + self.id.removeprefix("chatcmpl-"),
            "object": "response",
            "created_at": self.created,
            "model": self.model,
        }

    def response(self) -> dict[str, Any]:
        """The whole answer as a Responses ``response`` object."""
        text = "".join(self.pieces)
        content = [{"type": "output_text", "text": text, "annotations": []}]
        item = {"id": self.item_id, "type": "message", "status": "completed", "role": "assistant", "content": content}
        completed = self.finish_reason == "stop"
        usage = self.usage()
        return {
            **self.response_head(),
            "status": "completed" if completed else "incomplete",
            "error": None,
            "incomplete_details": None if completed else {"reason": "max_output_tokens"},
            "output": [item],
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            },
        }

    def message(self) -> dict[str, Any]:
        """The whole answer as an Anthropic ``message`` object."""
        usage = self.usage()
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": "".join(self.pieces)}],
            "stop_reason": "end_turn" if self.finish_reason == "stop" else "max_tokens",
            "stop_sequence": None,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]},
        }

    def usage_chunk(self) -> dict[str, Any]:
        return self.envelope("chat.completion.chunk", [], self.usage())

    def text_completion(self) -> dict[str, Any]:
        """The whole answer as a legacy ``text_completion``."""
        choice = {"index": 0, "text": "".join(self.pieces), "logprobs": None, "finish_reason": self.finish_reason}
        return {**self.envelope("text_completion", [choice], None), "usage": self.usage()}

    def ollama(self, generate: bool, text: str, done: bool) -> dict[str, Any]:
        """One Ollama line (the final one when ``done``)."""
        head: dict[str, Any] = {"model": self.model, "created_at": self.created_at}
        head.update({"response": text} if generate else {"message": {"role": "assistant", "content": text}})
        head["done"] = done
        if done:
            usage = self.usage()
            head["done_reason"] = self.finish_reason
            head.update(prompt_eval_count=usage["prompt_tokens"], eval_count=usage["completion_tokens"])
        return head

    def gemini_chunks(self) -> list[dict[str, Any]]:
        """The answer as Gemini chunks, one per piece; the last carries ``finishReason`` and usage."""
        usage = self.usage()
        chunks = []
        for number, piece in enumerate(self.pieces or [""]):
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": piece}]}, "index": 0}
            chunk: dict[str, Any] = {"candidates": [candidate]}
            if number == max(len(self.pieces) - 1, 0):
                candidate["finishReason"] = "STOP" if self.finish_reason == "stop" else "MAX_TOKENS"
                chunk["usageMetadata"] = {
                    "promptTokenCount": usage["prompt_tokens"],
                    "candidatesTokenCount": usage["completion_tokens"],
                    "totalTokenCount": usage["total_tokens"],
                }
            chunks.append({**chunk, "modelVersion": self.model, "responseId": self.id.removeprefix("chatcmpl-")})
        return chunks

    def gemini(self) -> dict[str, Any]:
        """The whole answer as one Gemini response."""
        last = self.gemini_chunks()[-1]
        candidate = {**last["candidates"][0], "content": {"role": "model", "parts": [{"text": "".join(self.pieces)}]}}
        return {**last, "candidates": [candidate]}

    def completion(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(self.pieces), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        return self.envelope("chat.completion", [choice], self.usage())

    def envelope(self, kind: str, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        envelope: dict[str, Any] = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        # OpenAI sends `"usage": null` on every chunk once usage was asked for, and the totals last.
        if usage is not None or self.include_usage:
            envelope["usage"] = usage
        return envelope


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _sse_event(payload: object) -> bytes:
    # Compact ASCII JSON holds no newline, so every event is exactly one `data:` line.
    return b"data: " + _dumps(payload) + b"\n\n"


async def _send_error(send: Send, error: _BadRequest) -> None:
    envelope = openai_error(error.message, type="invalid_request_error", code=error.code, param=error.param)
    await send_json(send, error.status, envelope)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client left first."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > MAX_REQUEST_BYTES:
            raise _BadRequest(413, f"The request body exceeds {MAX_REQUEST_BYTES} bytes.", None, "request_too_large")
        if not message.get("more_body", False):
            return bytes(body)


def _as_chat_request(request: dict[str, Any], dialect: str) -> dict[str, Any]:
    """A request in ``dialect`` read as the chat request the demo answers."""
    if dialect == "chat":
        return request
    messages: list[Any] = []
    stream = request.get("stream", False)
    options = request.get("options")
    config = request.get("generationConfig")
    if dialect == "responses":
        given = request.get("input")
        if isinstance(given, str):
            messages = [{"role": "user", "content": given}]
        elif isinstance(given, list):
            messages = [item for item in given if isinstance(item, dict) and "role" in item]
        limit = request.get("max_output_tokens")
    elif dialect in ("completions", "ollama_generate"):
        prompt = request.get("prompt")
        prompt = " ".join(p for p in prompt if isinstance(p, str)) if isinstance(prompt, list) else prompt
        messages = [{"role": "user", "content": prompt if isinstance(prompt, str) else ""}]
        limit = request.get("max_tokens")
    elif dialect.startswith("gemini"):
        contents = request.get("contents")
        contents = [{"parts": [{"text": contents}]}] if isinstance(contents, str) else contents or []
        for content in contents if isinstance(contents, list) else ():
            if isinstance(content, dict) and content.get("role", "user") == "user":
                parts = content.get("parts")
                texts = (p.get("text") for p in parts if isinstance(p, dict)) if isinstance(parts, list) else ()
                text = "".join(t for t in texts if isinstance(t, str))
                messages.append({"role": "user", "content": text})
        stream = dialect == "gemini_stream"
        limit = config.get("maxOutputTokens") if isinstance(config, dict) else None
    else:
        given = request.get("messages")
        messages = given if isinstance(given, list) else []
        limit = request.get("max_tokens")
    if dialect.startswith("ollama"):
        stream = request.get("stream", True)  # Ollama streams unless told not to
        limit = options.get("num_predict") if isinstance(options, dict) else None
    chat = {"model": request.get("model"), "stream": stream, "messages": messages}
    if limit is not None:
        chat["max_tokens"] = limit
    return chat


def _parse_request(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except ValueError:  # includes invalid UTF-8
        raise _BadRequest(400, "The request body is not valid JSON.", None, "invalid_json") from None
    if not isinstance(request, dict):
        raise _BadRequest(400, "The request body must be a JSON object.", None, "invalid_json")
    return request


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    # uvicorn drops messages sent after a disconnect instead of failing, so `http.disconnect`
    # is the signal that stops the stream.
    message: Message = {"type": "http.request"}
    while message["type"] != "http.disconnect":
        message = await receive()
    scope.cancel()


class DemoModel:
    """ASGI app imitating an OpenAI-compatible model server with deterministic answers.

    Routes: ``POST /v1/chat/completions`` (streaming or not, see the module docstring for the
    answers), ``GET /v1/models``; anything else is a 404 in OpenAI's error envelope. A
    streamed answer stops as soon as the client disconnects.
    """

    def __init__(
        self,
        *,
        seconds_per_token: float = 0.025,
        keepalive_seconds: float = 1.0,
        stall_seconds: float = 600.0,
        model_id: str = DEMO_MODEL_ID,
    ) -> None:
        """Create the app.

        Args:
            seconds_per_token: pause before each streamed content delta; the default of 25 ms
                is about 40 tokens per second. Non-streaming answers are not delayed.
            keepalive_seconds: interval between ``: keep-alive`` comments while stalled.
            stall_seconds: how long the ``stall`` answer stays silent before it finishes.
            model_id: the model listed by ``/v1/models`` and used when a request names none.

        Raises:
            ValueError: a duration is negative, or ``keepalive_seconds`` is not positive.
        """
        if seconds_per_token < 0 or stall_seconds < 0 or keepalive_seconds <= 0:
            raise ValueError("durations must be non-negative and keepalive_seconds positive")
        self._seconds_per_token = seconds_per_token
        self._keepalive_seconds = keepalive_seconds
        self._stall_seconds = stall_seconds
        self._model_id = model_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (HTTP and lifespan; websockets are refused)."""
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
        elif scope["type"] == "http":
            await self._route(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        dialect = _ROUTES.get(path) if method == "POST" else None
        gemini = _GEMINI_PATH.fullmatch(path) if method == "POST" else None
        if gemini is not None:
            streamed = gemini.group(2) == "streamGenerateContent"
            sse = b"alt=sse" in scope.get("query_string", b"").split(b"&")
            dialect = ("gemini_stream" if sse else "gemini_array") if streamed else "gemini_whole"
            scope = {**scope, "model": gemini.group(1)}
        if dialect is not None:
            await self._chat(receive, send, dialect=dialect, model=scope.get("model"))
        elif (method, path) == ("GET", "/v1/models"):
            model = {"id": self._model_id, "object": "model", "created": 1735689600, "owned_by": "guardrail"}
            await send_json(send, 200, {"object": "list", "data": [model]})
        else:
            await _send_error(send, _BadRequest(404, f"Invalid URL ({method} {path})", None, None))

    async def _chat(self, receive: Receive, send: Send, *, dialect: str = "chat", model: str | None = None) -> None:
        try:
            body = await _read_body(receive)
            if body is None:
                return
            request = _as_chat_request(_parse_request(body), dialect.removesuffix("_array"))
            if model:
                request["model"] = model
            reply = _Reply(request, self._model_id)
        except _BadRequest as error:
            await _send_error(send, error)
            return
        logger.debug("demo answer %s (stream=%s, %s)", reply.scenario, reply.stream, dialect)
        if not reply.stream and dialect != "gemini_stream":
            if dialect.startswith("ollama"):
                await send_json(send, 200, reply.ollama(dialect == "ollama_generate", "".join(reply.pieces), True))
                return
            whole = {
                "chat": reply.completion,
                "responses": reply.response,
                "messages": reply.message,
                "completions": reply.text_completion,
                "gemini_whole": reply.gemini,
                "gemini_array": reply.gemini_chunks,
            }[dialect]
            await send_json(send, 200, whole())
            return
        streams: dict[str, Callable[[_Reply, Send], Awaitable[None]]] = {
            "chat": self._stream,
            "responses": self._stream_response,
            "messages": self._stream_message,
            "completions": self._stream_completion,
            "ollama_chat": self._stream_ollama,
            "ollama_generate": functools.partial(self._stream_ollama, generate=True),
            "gemini_stream": self._stream_gemini,
        }
        stream = streams[dialect]
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(_cancel_on_disconnect, receive, task_group.cancel_scope)
            try:
                await stream(reply, send)
            except OSError:
                logger.debug("client went away during a demo stream")
            task_group.cancel_scope.cancel()

    async def _pieces(self, reply: _Reply, emit: Callable[[str], Awaitable[None]], keepalive: Any = None) -> None:
        """Emit the answer's pieces at the demo's pace, stalling where the answer says."""
        for index, piece in enumerate(reply.pieces):
            if index == reply.stall_at:
                await self._stall(keepalive)
            await anyio.sleep(self._seconds_per_token)
            await emit(piece)

    async def _stream(self, reply: _Reply, send: Send) -> None:
        async def emit(event: bytes) -> None:
            await send({"type": "http.response.body", "body": event, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await emit(_sse_event(reply.chunk({"role": "assistant", "content": ""})))

        async def content(piece: str) -> None:
            await emit(_sse_event(reply.chunk({"content": piece})))

        await self._pieces(reply, content, emit)
        await emit(_sse_event(reply.chunk({}, reply.finish_reason)))
        if reply.include_usage:
            await emit(_sse_event(reply.usage_chunk()))
        await send({"type": "http.response.body", "body": _DONE_EVENT, "more_body": False})

    async def _stream_response(self, reply: _Reply, send: Send) -> None:
        """The answer as a Responses event stream (wire-formats §3.3)."""
        numbers = iter(range(1_000_000))

        async def emit(kind: str, **fields: Any) -> None:
            event = {"type": kind, "sequence_number": next(numbers), **fields}
            data = b"event: " + kind.encode() + b"\n" + _sse_event(event)
            await send({"type": "http.response.body", "body": data, "more_body": True})

        head = reply.response_head()
        where = {"item_id": reply.item_id, "output_index": 0, "content_index": 0}
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await emit("response.created", response={**head, "status": "in_progress", "output": [], "usage": None})
        item = {"id": reply.item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        await emit("response.output_item.added", output_index=0, item=item)
        await emit("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})

        async def delta(piece: str) -> None:
            await emit("response.output_text.delta", **where, delta=piece, logprobs=[])

        await self._pieces(reply, delta)
        whole = reply.response()
        done_item = whole["output"][0]
        text = done_item["content"][0]["text"]
        await emit("response.output_text.done", **where, text=text, logprobs=[])
        await emit("response.content_part.done", **where, part=done_item["content"][0])
        await emit("response.output_item.done", output_index=0, item=done_item)
        await emit(f"response.{whole['status']}", response=whole)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream_message(self, reply: _Reply, send: Send) -> None:
        """The answer as an Anthropic Messages event stream (wire-formats §4.1)."""

        async def emit(kind: str, **fields: Any) -> None:
            data = b"event: " + kind.encode() + b"\n" + _sse_event({"type": kind, **fields})
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        whole = reply.message()
        await emit(
            "message_start",
            message={**whole, "content": [], "stop_reason": None, "usage": {**whole["usage"], "output_tokens": 1}},
        )
        await emit("content_block_start", index=0, content_block={"type": "text", "text": ""})

        async def text(piece: str) -> None:
            await emit("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})

        await self._pieces(reply, text)
        await emit("content_block_stop", index=0)
        delta = {"stop_reason": whole["stop_reason"], "stop_sequence": None}
        await emit("message_delta", delta=delta, usage={"output_tokens": whole["usage"]["output_tokens"]})
        await emit("message_stop")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream_completion(self, reply: _Reply, send: Send) -> None:
        """The answer as a legacy completions stream: chat's, with ``choices[].text``."""

        async def emit(event: bytes) -> None:
            await send({"type": "http.response.body", "body": event, "more_body": True})

        async def text(piece: str, finish_reason: str | None = None) -> None:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish_reason}
            await emit(_sse_event(reply.envelope("text_completion", [choice], None)))

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await self._pieces(reply, text, emit)
        await text("", reply.finish_reason)
        if reply.include_usage:
            await emit(_sse_event(reply.envelope("text_completion", [], reply.usage())))
        await send({"type": "http.response.body", "body": _DONE_EVENT, "more_body": False})

    async def _stream_ollama(self, reply: _Reply, send: Send, *, generate: bool = False) -> None:
        """The answer as Ollama's NDJSON lines (wire-formats §5), for ``/api/chat`` or ``/api/generate``."""

        async def line(piece: str) -> None:
            body = _dumps(reply.ollama(generate, piece, False)) + b"\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": _NDJSON_HEADERS})
        await self._pieces(reply, line)
        final = _dumps(reply.ollama(generate, "", True)) + b"\n"
        await send({"type": "http.response.body", "body": final, "more_body": False})

    async def _stream_gemini(self, reply: _Reply, send: Send) -> None:
        """The answer as Gemini's ``alt=sse`` events: the last piece carries ``finishReason``."""
        chunks = reply.gemini_chunks()
        numbers = iter(range(len(chunks)))

        async def event(piece: str) -> None:
            body = _sse_event(chunks[next(numbers)])
            await send({"type": "http.response.body", "body": body, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await self._pieces(reply, event)
        rest = b"".join(_sse_event(chunks[number]) for number in numbers)  # (an empty answer's one chunk)
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    async def _stall(self, emit: Callable[[bytes], Awaitable[None]] | None) -> None:
        """Say nothing for a while: keep-alive comments where the dialect allows them, else silence."""
        with anyio.move_on_after(self._stall_seconds):
            while True:
                await anyio.sleep(self._keepalive_seconds)
                if emit is not None:
                    await emit(_KEEPALIVE_EVENT)
