"""Streams drawn from the whole grammar a dialect's parser accepts, and a client's-eye leak check.

A generator builds one response from a seed: banned matches and ordinary text spread over every
text-bearing field, split at random points (inside UTF-8 characters on the wire), finish marks
in every placement, logprobs, several choices, text after a finish, error events, comments, ids,
unknown fields, objects that repeat a key. :func:`leaks` reads what a client receives the way a client does: every JSON
string decoded, and each channel's text joined across events, and reports any banned match.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import regex

from guardrail.core.rule import Action, BoundRule
from guardrail.core.sse import SSEDecoder
from guardrail.rules.banned import BannedPatterns, phrase_pattern

PATTERNS = [
    r"(?<![A-Za-z0-9])sk-[A-Za-z0-9]{20,}",
    r"-----BEGIN[A-Z ]{0,20}PRIVATE KEY-----[A-Za-z0-9+/=\s]{0,400}?-----END[A-Z ]{0,20}PRIVATE KEY-----",
]
PHRASES = ["project starlight", "비밀번호"]
BANNED = [
    "sk-" + "Zq9Xw8Vu7Ts6Rq5Po4Nm3Lk2",
    "Project  Starlight",
    "PROJECT\nstarlight",
    "비밀번호",
    "sk-proj" + "A" * 22,
    "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKL\n"
    "-----END RSA PRIVATE KEY-----",
]
ORDINARY = [
    "Sure. ",
    "the ",
    "project ",
    "star",
    "lights ",
    "sk-",
    "short ",
    "관리자 ",
    "는 ",
    "é",
    "😀 ",
    "\u2028",
    "-",
    "\n",
    "— ",
    "key ",
]
DETECT = regex.compile("|".join([*PATTERNS, *(phrase_pattern(p) for p in PHRASES)]))


def rules(action: Action) -> list[BoundRule]:
    return [BoundRule("banned", BannedPatterns(patterns=PATTERNS, phrases=PHRASES), action, replacement="[x]")]


def text(rng: random.Random, banned: float = 0.35) -> str:
    """Ordinary words and banned matches, glued together in any order (no separators assumed)."""
    return "".join(
        rng.choice(BANNED) if rng.random() < banned else rng.choice(ORDINARY) for _ in range(rng.randint(1, 8))
    )


def cut(rng: random.Random, value: str, most: int = 6) -> list[str]:
    """``value`` in up to ``most`` pieces, cut anywhere (joining them gives it back)."""
    if not value:
        return [value]
    cuts = sorted(rng.sample(range(1, len(value) + 1), min(len(value), rng.randint(0, most))))
    bounds = [0, *cuts, len(value)]
    return [value[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a] or [value]


def rechunk(rng: random.Random, body: bytes) -> list[bytes]:
    """The body's bytes cut at random places (inside events and UTF-8 characters alike)."""
    cuts = sorted(set(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 12))))) if len(body) > 1 else []
    bounds = [0, *cuts, len(body)]
    return [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def repeating(value: object, rng: random.Random) -> str:
    """JSON for ``value`` in which some objects repeat a key, first with other text.

    Parsers disagree on which value of a repeated key counts: a client keeping the first
    would show that text.
    """
    if isinstance(value, dict):
        members = [f"{json.dumps(key)}:{repeating(child, rng)}" for key, child in value.items()]
        if value and rng.random() < 0.3:
            members.insert(0, f"{json.dumps(rng.choice(list(value)))}:{json.dumps(text(rng))}")
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(repeating(child, rng) for child in value) + "]"
    return json.dumps(value)


def json_text(obj: object, rng: random.Random) -> str:
    if rng.random() < 0.02:
        return repeating(obj, rng)
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5)


def client_json(data: str | bytes, seen: list[str]) -> Any:
    """``data`` parsed as the SDKs parse it (the last value of a repeated key wins); the strings of
    the values it shadows go to ``seen``, since a client keeping the first would show them."""

    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                seen.extend(_strings(obj[key]))
            obj[key] = value
        return obj

    return json.loads(data, object_pairs_hook=members)


def sse(obj: object, rng: random.Random) -> bytes:
    data = json_text(obj, rng)
    prefix = b""
    if rng.random() < 0.05:
        prefix += f": {text(rng)}\n".replace("\n\n", "\n").encode()[:200].split(b"\n")[0] + b"\n"
    if rng.random() < 0.05:
        prefix += b"id: " + text(rng).replace("\n", " ").replace("\r", " ").encode() + b"\n"
    return prefix + f"data: {data}\n\n".encode()


# -- OpenAI chat -----------------------------------------------------------------------------

_FIELDS = (
    "content",
    "content_parts",
    "refusal",
    "reasoning_content",
    "reasoning",
    "arguments",
    "arguments_object",
    "tool_name",
    "function_call",
    "audio",
)


def _delta(field: str, value: str, tool: int) -> dict[str, Any]:
    if field == "content_parts":
        return {"content": [{"type": "text", "text": value}]}
    if field == "arguments":
        return {"tool_calls": [{"index": tool, "function": {"arguments": value}}]}
    if field == "arguments_object":
        return {"tool_calls": [{"index": tool, "function": {"arguments": {"q": value}}}]}
    if field == "tool_name":
        return {"tool_calls": [{"index": tool, "id": "call_1", "type": "function", "function": {"name": value}}]}
    if field == "function_call":
        return {"function_call": {"arguments": value}}
    if field == "audio":
        return {"audio": {"id": "audio_1", "transcript": value}}
    return {field: value}


def chat_stream(rng: random.Random) -> bytes:
    """One chat completion stream from the grammar."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    choices = list(range(rng.choice([1, 1, 2])))
    events: list[bytes] = []
    plan: list[tuple[int, str, str]] = []
    for index in choices:
        for _ in range(rng.randint(1, 3)):
            field = rng.choice(_FIELDS)
            plan.extend((index, field, piece) for piece in cut(rng, text(rng)))
    rng.shuffle(plan) if rng.random() < 0.2 else None
    finishes = {index: rng.choice(["stop", "", None, "absent", "stop"]) for index in choices}
    with_logprobs = rng.random() < 0.3
    for number, (index, field, piece) in enumerate(plan):
        choice: dict[str, Any] = {"index": index, "delta": _delta(field, piece, rng.randint(0, 1))}
        last = all(other != index for other, _, _ in plan[number + 1 :])
        reason = finishes[index]
        if reason != "absent":
            choice["finish_reason"] = reason if (last and rng.random() < 0.5) or reason in ("", None) else None
        if with_logprobs and field in ("content", "refusal"):
            # As servers send them with "logprobs": true: on every content and refusal chunk; now
            # and then (a hostile upstream) tokens that are not the chunk's text.
            spelled = piece if rng.random() < 0.9 else text(rng)
            entries = [
                {"token": t, "logprob": -0.1, "bytes": list(t.encode()), "top_logprobs": []}
                for t in cut(rng, spelled, 3)
            ]
            choice["logprobs"] = {field: entries}
        obj: dict[str, Any] = {**head, "choices": [choice]}
        if rng.random() < 0.03:
            obj[rng.choice(["x_note", text(rng)])] = text(rng)
        events.append(sse(obj, rng))
        if rng.random() < 0.05:
            events.append(b": keep-alive\n\n")
    for index in choices:
        if finishes[index] == "stop":
            events.append(sse({**head, "choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]}, rng))
    roll = rng.random()
    if roll < 0.05:
        events.append(sse({"error": {"message": text(rng), "type": "server_error"}}, rng))
    elif roll < 0.1:
        events.append(f"data: [DONE] {text(rng)}\n\n".encode())
    elif roll < 0.15:
        events.append(sse(text(rng), rng))  # data that is JSON but not an object
    else:
        events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def _sse_objects(wire: bytes, seen: list[str]) -> Iterator[Any]:
    """The JSON value of each event a client reads; its SSE strings, and data that is not JSON, go to ``seen``."""
    decoder = SSEDecoder()
    for event in [*decoder.feed(wire), *decoder.close()]:
        seen.extend(value for value in (event.event, event.id, *event.comments) if value)
        if event.data is None:
            continue
        try:
            yield client_json(event.data, seen)
        except ValueError:
            seen.append(event.data)


def chat_client(wire: bytes) -> list[str]:
    """Every string a chat client can show: each JSON string, and each field's text joined across events."""
    seen: list[str] = []
    joined: dict[str, str] = {}
    for obj in _sse_objects(wire, seen):
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            seen.extend(_strings(obj))
            continue
        # Channel text is checked as the client joins it; everything else string by string.
        seen.extend(_strings({key: value for key, value in obj.items() if key != "choices"}))
        for choice in obj["choices"]:
            if not isinstance(choice, dict):
                seen.extend(_strings(choice))
                continue
            seen.extend(_strings({key: value for key, value in choice.items() if key not in ("delta", "logprobs")}))
            seen.extend(_keys(choice.get("delta")))
            prefix = f"{choice.get('index')}."
            for path, value in _leaves(choice.get("delta"), ""):
                key = prefix + regex.sub(r"\.\d+\.text$", "", path)
                joined[key] = joined.get(key, "") + value
            logprobs = choice.get("logprobs")
            if not isinstance(logprobs, dict):
                continue
            for kind in ("content", "refusal"):
                for entry in logprobs.get(kind) or ():
                    key = f"{prefix}logprobs.{kind}"
                    joined[key] = joined.get(key, "") + str(entry.get("token", ""))
                    decoded = bytes(entry.get("bytes") or []).decode("utf-8", "replace")
                    joined[key + ".bytes"] = joined.get(key + ".bytes", "") + decoded
    return seen + list(joined.values())


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, child in value.items() for s in (key, *_strings(child))]
    if isinstance(value, list):
        return [s for child in value for s in _strings(child)]
    return []


def _keys(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for key, child in value.items() for s in (key, *_keys(child))]
    if isinstance(value, list):
        return [s for child in value for s in _keys(child)]
    return []


def _leaves(value: object, path: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        out = []
        for key, child in value.items():
            if key == "tool_calls" and isinstance(child, list):
                for call in child:
                    if isinstance(call, dict):
                        out.extend(_leaves(call, f"{path}.tool_calls[{call.get('index')}]"))
            else:
                out.extend(_leaves(child, f"{path}.{key}"))
        return out
    if isinstance(value, list):
        return [leaf for pos, child in enumerate(value) for leaf in _leaves(child, f"{path}.{pos}")]
    return []


def leaks(strings: Sequence[str]) -> list[str]:
    """The banned matches in what the client can see."""
    return [match.group() for value in strings for match in DETECT.finditer(value)]


Generator = Callable[[random.Random], bytes]
Reader = Callable[[bytes], list[str]]


# -- OpenAI Responses ----------------------------------------------------------------------------


def _named(kind: str, obj: dict[str, Any], rng: random.Random) -> bytes:
    return (f"event: {kind}\n").encode() + sse(obj, rng)


def responses_stream(rng: random.Random) -> bytes:
    """One Responses stream from the grammar: message, function call and reasoning items, any order."""
    numbers = iter(range(100_000))
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        obj = {"type": kind, "sequence_number": next(numbers), **fields}
        if rng.random() < 0.03:
            obj[rng.choice(["x_note", text(rng)])] = text(rng)
        events.append(_named(kind, obj, rng))
        if rng.random() < 0.03:
            events.append(b": " + text(rng).replace("\n", " ").replace("\r", " ").encode() + b"\n\n")

    head = {"id": "resp_1", "object": "response", "created_at": 1, "model": "m"}
    emit("response.created", response={**head, "status": "in_progress", "output": []})
    with_logprobs = rng.random() < 0.3

    def logprobs(value: str) -> dict[str, Any]:
        # With "include": ["message.output_text.logprobs"]; now and then tokens that are not the text.
        if not with_logprobs:
            return {}
        spelled = value if rng.random() < 0.9 else text(rng)
        return {"logprobs": [{"token": t, "bytes": list(t.encode()), "logprob": -0.1} for t in cut(rng, spelled, 3)]}

    output: list[dict[str, Any]] = []
    for index in range(rng.randint(1, 3)):
        shape = rng.choice(["message", "message", "function_call", "reasoning"])
        item_id = f"item_{index}"
        if shape == "message":
            item: dict[str, Any] = {
                "id": item_id,
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            emit("response.output_item.added", output_index=index, item=item)
            parts = []
            for content in range(rng.randint(1, 2)):
                field, kind = rng.choice([("text", "output_text"), ("refusal", "refusal")])
                where = {"item_id": item_id, "output_index": index, "content_index": content}
                emit("response.content_part.added", **where, part={"type": kind, field: ""})
                value = text(rng)
                prefix = "response.output_text" if kind == "output_text" else "response.refusal"
                for piece in cut(rng, value):
                    emit(f"{prefix}.delta", **where, delta=piece, **(logprobs(piece) if kind == "output_text" else {}))
                emit(f"{prefix}.done", **where, **{field: value}, **(logprobs(value) if kind == "output_text" else {}))
                emit("response.content_part.done", **where, part={"type": kind, field: value})
                parts.append({"type": kind, field: value})
            item = {**item, "status": "completed", "content": parts}
        elif shape == "function_call":
            item = {
                "id": item_id,
                "type": "function_call",
                "status": "in_progress",
                "call_id": "c1",
                "name": "f",
                "arguments": "",
            }
            emit("response.output_item.added", output_index=index, item=item)
            value = text(rng)
            for piece in cut(rng, value):
                emit("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=piece)
            emit("response.function_call_arguments.done", item_id=item_id, output_index=index, arguments=value)
            item = {**item, "status": "completed", "arguments": value}
        else:
            item = {"id": item_id, "type": "reasoning", "summary": []}
            emit("response.output_item.added", output_index=index, item=item)
            value = text(rng)
            where = {"item_id": item_id, "output_index": index, "summary_index": 0}
            for piece in cut(rng, value):
                emit("response.reasoning_summary_text.delta", **where, delta=piece)
            emit("response.reasoning_summary_text.done", **where, text=value)
            item = {**item, "summary": [{"type": "summary_text", "text": value}]}
        emit("response.output_item.done", output_index=index, item=item)
        output.append(item)
    roll = rng.random()
    if roll < 0.05:
        emit("error", code="server_error", message=text(rng), param=None)
    elif roll < 0.1:
        emit(
            "response.incomplete",
            response={
                **head,
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
                "output": output,
            },
        )
    else:
        emit("response.completed", response={**head, "status": "completed", "output": output})
    return b"".join(events)


def responses_client(wire: bytes) -> list[str]:
    """Every string a Responses client can show: each JSON string outside deltas, each channel's deltas joined."""
    seen: list[str] = []
    joined: dict[str, str] = {}
    for obj in _sse_objects(wire, seen):
        if isinstance(obj, dict) and isinstance(obj.get("type"), str) and obj["type"].endswith(".delta"):
            key = f"{obj['type']}:{obj.get('output_index')}:{obj.get('content_index')}:{obj.get('summary_index')}"
            joined[key] = joined.get(key, "") + str(obj.get("delta", ""))
            tokens = "".join(str(e.get("token", "")) for e in obj.get("logprobs") or () if isinstance(e, dict))
            joined[key + ":tokens"] = joined.get(key + ":tokens", "") + tokens
            obj = {k: v for k, v in obj.items() if k not in ("delta", "logprobs")}
        elif isinstance(obj, dict) and isinstance(obj.get("logprobs"), list):
            # A done event's tokens, joined as a client joins them
            seen.append("".join(str(e.get("token", "")) for e in obj["logprobs"] if isinstance(e, dict)))
            obj = {k: v for k, v in obj.items() if k != "logprobs"}
        seen.extend(_strings(obj))
    return seen + list(joined.values())


# -- Anthropic Messages ----------------------------------------------------------------------------


def messages_stream(rng: random.Random) -> bytes:
    """One Messages stream from the grammar: text, thinking and tool blocks, pings, noise."""
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        obj = {"type": kind, **fields}
        if rng.random() < 0.03:
            obj[rng.choice(["x_note", text(rng)])] = text(rng)
        events.append(_named(kind, obj, rng))
        if rng.random() < 0.05:
            events.append(_named("ping", {"type": "ping"}, rng))

    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    emit("message_start", message=message)
    for index in range(rng.randint(1, 3)):
        shape = rng.choice(["text", "text", "thinking", "tool_use"])
        if shape == "tool_use":
            emit(
                "content_block_start",
                index=index,
                content_block={"type": "tool_use", "id": "t1", "name": "f", "input": {}},
            )
            for piece in cut(rng, json.dumps({"q": text(rng)})):
                emit("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": piece})
        else:
            field = "text" if shape == "text" else "thinking"
            emit("content_block_start", index=index, content_block={"type": shape, field: ""})
            for piece in cut(rng, text(rng)):
                emit("content_block_delta", index=index, delta={"type": f"{field}_delta", field: piece})
        emit("content_block_stop", index=index)
    if rng.random() < 0.05:
        emit("error", error={"type": "overloaded_error", "message": text(rng)})
    else:
        emit("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage={"output_tokens": 5})
        emit("message_stop")
    return b"".join(events)


def messages_client(wire: bytes) -> list[str]:
    """Every string an Anthropic client can show: each JSON string outside deltas, each block's deltas joined."""
    seen: list[str] = []
    joined: dict[str, str] = {}
    for obj in _sse_objects(wire, seen):
        delta = obj.get("delta") if isinstance(obj, dict) and obj.get("type") == "content_block_delta" else None
        if isinstance(delta, dict):
            for field in ("text", "thinking", "partial_json"):
                if isinstance(delta.get(field), str):
                    key = f"{obj.get('index')}:{field}"
                    joined[key] = joined.get(key, "") + delta[field]
            obj = {**obj, "delta": {k: v for k, v in delta.items() if k not in ("text", "thinking", "partial_json")}}
        seen.extend(_strings(obj))
    return seen + [_unescaped(value) for value in joined.values()]


def _unescaped(value: str) -> str:
    """A tool input's JSON text as the client reads it: its strings decoded."""
    try:
        return "\n".join(_strings(json.loads(value)))
    except ValueError:  # cut short: read as a partial-JSON parser reads it, escapes decoded
        return _ESCAPE.sub(_decode_escape, value)


def _decode_escape(match: regex.Match[str]) -> str:
    escape = match.group()
    if escape.startswith("\\u") and len(escape) < 6:
        return ""  # a \\u escape cut short: not yet a character
    decoded: str = json.loads(f'"{escape}"')
    return decoded


_ESCAPE = regex.compile(r'\\u[0-9a-fA-F]{4}|\\["\\/bfnrt]|\\u[0-9a-fA-F]{0,3}$')


# -- Ollama (NDJSON) --------------------------------------------------------------------------------


def ollama_stream(rng: random.Random) -> bytes:
    """One Ollama /api/chat answer: content, thinking and tool calls, text on the final line, errors."""
    head = {"model": "m", "created_at": "2024-01-01T00:00:00Z"}
    lines: list[dict[str, Any]] = []
    plan = [(field, piece) for field in ("content", "thinking") for piece in cut(rng, text(rng)) if rng.random() < 0.9]
    rng.shuffle(plan) if rng.random() < 0.2 else None
    with_logprobs = rng.random() < 0.3
    for field, piece in plan:
        message: dict[str, Any] = {"role": "assistant", "content": "", field: piece}
        if rng.random() < 0.05:
            message["tool_calls"] = [{"function": {"name": "f", "arguments": {"q": text(rng)}}}]
        line: dict[str, Any] = {**head, "message": message, "done": False}
        if field == "content" and with_logprobs:  # on every content line; now and then not the text
            spelled = piece if rng.random() < 0.9 else text(rng)
            line["logprobs"] = [{"token": t, "logprob": -0.1, "bytes": list(t.encode())} for t in cut(rng, spelled, 3)]
        if rng.random() < 0.03:
            line[rng.choice(["x_note", text(rng)])] = text(rng)
        lines.append(line)
    final: dict[str, Any] = {
        **head,
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
    }
    if rng.random() < 0.3:
        final["message"]["content"] = text(rng)  # text on the final line
    body = [json_text(line, rng).encode() + b"\n" for line in [*lines, final]]
    if rng.random() < 0.05:
        body.insert(rng.randint(0, len(body)), json.dumps({"error": text(rng)}).encode() + b"\n")
    return b"".join(body)


def ollama_client(wire: bytes) -> list[str]:
    """Every string the ollama client can show: each JSON string, and content and thinking joined."""
    seen: list[str] = []
    joined: dict[str, str] = {}
    for line in wire.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = client_json(line, seen)
        except ValueError:
            seen.append(line.decode("utf-8", "replace"))
            continue
        message = obj.get("message") if isinstance(obj, dict) else None
        if isinstance(message, dict):
            for field in ("content", "thinking"):
                if isinstance(message.get(field), str):
                    joined[field] = joined.get(field, "") + message[field]
            obj = {**obj, "message": {k: v for k, v in message.items() if k not in ("content", "thinking")}}
        if isinstance(obj, dict) and isinstance(obj.get("logprobs"), list):
            tokens = "".join(str(e.get("token", "")) for e in obj["logprobs"] if isinstance(e, dict))
            joined["tokens"] = joined.get("tokens", "") + tokens
            obj = {k: v for k, v in obj.items() if k != "logprobs"}
        seen.extend(_strings(obj))
    return seen + list(joined.values())


# -- OpenAI legacy completions ---------------------------------------------------------------------


def completions_stream(rng: random.Random) -> bytes:
    """One legacy completion stream: choices' text, finish reasons anywhere, logprobs, noise."""
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    choices = list(range(rng.choice([1, 1, 2])))
    plan = [(index, piece) for index in choices for piece in cut(rng, text(rng))]
    rng.shuffle(plan) if rng.random() < 0.2 else None
    finishes = {index: rng.choice(["stop", "", None, "absent"]) for index in choices}
    with_logprobs = rng.random() < 0.3
    events: list[bytes] = []
    for number, (index, piece) in enumerate(plan):
        choice: dict[str, Any] = {"index": index, "text": piece}
        last = all(other != index for other, _ in plan[number + 1 :])
        reason = finishes[index]
        if reason != "absent":
            choice["finish_reason"] = reason if (last and rng.random() < 0.5) or reason in ("", None) else None
        if with_logprobs:
            tokens = cut(rng, piece if rng.random() < 0.9 else text(rng), 3)
            choice["logprobs"] = {
                "tokens": tokens,
                "token_logprobs": [-0.1] * len(tokens),
                "text_offset": [0] * len(tokens),
            }
        events.append(sse({**head, "choices": [choice]}, rng))
    if rng.random() < 0.05:
        events.append(sse({"error": {"message": text(rng), "type": "server_error"}}, rng))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def completions_client(wire: bytes) -> list[str]:
    """Every string a completions client can show: each choice's text, and its logprobs tokens, joined."""
    seen: list[str] = []
    joined: dict[str, str] = {}
    for obj in _sse_objects(wire, seen):
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            seen.extend(_strings(obj))
            continue
        seen.extend(_strings({key: value for key, value in obj.items() if key != "choices"}))
        for choice in obj["choices"]:
            if not isinstance(choice, dict):
                seen.extend(_strings(choice))
                continue
            rest = {key: value for key, value in choice.items() if key not in ("text", "logprobs")}
            seen.extend(_strings(rest))
            index = choice.get("index")
            if isinstance(choice.get("text"), str):
                joined[f"{index}"] = joined.get(f"{index}", "") + choice["text"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                tokens = "".join(t for t in logprobs.get("tokens") or () if isinstance(t, str))
                joined[f"{index}.tokens"] = joined.get(f"{index}.tokens", "") + tokens
    return seen + list(joined.values())


def completions_guard(rules: list[BoundRule]) -> Any:
    from guardrail.core.dialect import Framing
    from guardrail.core.dialects.openai_completions import CompletionsStream
    from guardrail.core.engine import StreamGuard

    return StreamGuard(rules, CompletionsStream(Framing.SSE))


# -- Gemini ------------------------------------------------------------------------------------------


def gemini_stream(rng: random.Random) -> bytes:
    """One Gemini alt=sse stream: text, thought and function-call parts, finishReason anywhere, logprobs."""
    candidates = list(range(rng.choice([1, 1, 2])))
    plan = [
        (index, kind, piece) for index in candidates for kind in ("text", "thought") for piece in cut(rng, text(rng))
    ]
    plan = [step for step in plan if step[1] == "text" or rng.random() < 0.5]
    rng.shuffle(plan) if rng.random() < 0.2 else None
    with_logprobs = rng.random() < 0.3
    events: list[bytes] = []
    for number, (index, kind, piece) in enumerate(plan):
        part: dict[str, Any] = {"text": piece, **({"thought": True} if kind == "thought" else {})}
        if rng.random() < 0.05:
            part = {"functionCall": {"name": "f", "args": {"q": text(rng)}}}
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [part]}, "index": index}
        if all(other != index for other, _, _ in plan[number + 1 :]) and rng.random() < 0.7:
            candidate["finishReason"] = "STOP"  # text on the chunk that finishes
        if with_logprobs and kind == "text":
            candidate["logprobsResult"] = {
                "chosenCandidates": [{"token": t, "logProbability": -0.1} for t in cut(rng, piece, 3)]
            }
        chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": "m", "responseId": "r"}
        if rng.random() < 0.03:
            chunk[rng.choice(["x_note", text(rng)])] = text(rng)
        events.append(sse(chunk, rng))
    if rng.random() < 0.05:
        events.append(sse({"error": {"code": 500, "message": text(rng), "status": "INTERNAL"}}, rng))
    return b"".join(events)


def gemini_client(wire: bytes) -> list[str]:
    """Every string google-genai can show: each candidate's text, thought and logprobs tokens joined."""
    seen: list[str] = []
    joined: dict[str, str] = {}
    for obj in _sse_objects(wire, seen):
        if not isinstance(obj, dict) or not isinstance(obj.get("candidates"), list):
            seen.extend(_strings(obj))
            continue
        seen.extend(_strings({key: value for key, value in obj.items() if key != "candidates"}))
        for candidate in obj["candidates"]:
            index = candidate.get("index")
            content = candidate.get("content") or {}
            for part in content.get("parts") or ():
                if isinstance(part.get("text"), str):
                    key = f"{index}.{'thought' if part.get('thought') else 'text'}"
                    joined[key] = joined.get(key, "") + part["text"]
                seen.extend(_strings({k: v for k, v in part.items() if k != "text"}))
            logprobs = candidate.get("logprobsResult") or {}
            tokens = "".join(c.get("token", "") for c in logprobs.get("chosenCandidates") or ())
            joined[f"{index}.tokens"] = joined.get(f"{index}.tokens", "") + tokens
            seen.extend(_strings({k: v for k, v in candidate.items() if k not in ("content", "logprobsResult")}))
    return seen + list(joined.values())


def gemini_guard(rules: list[BoundRule]) -> Any:
    from guardrail.core.dialect import Framing
    from guardrail.core.dialects.gemini import GeminiStream
    from guardrail.core.engine import StreamGuard

    return StreamGuard(rules, GeminiStream(Framing.SSE))


# -- Vercel AI SDK UI message stream -----------------------------------------------------------------


def ui_stream(rng: random.Random) -> bytes:
    """One UI message stream: text, reasoning and tool-input parts (streamed or whole), data parts, noise."""
    parts: list[dict[str, Any]] = [{"type": "start", "messageId": "m1"}, {"type": "start-step"}]
    for number in range(rng.randint(1, 3)):
        shape = rng.choice(["text", "text", "reasoning", "tool", "tool_whole", "data"])
        ident = f"p{number}"
        if shape in ("text", "reasoning"):
            parts.append({"type": f"{shape}-start", "id": ident})
            parts.extend({"type": f"{shape}-delta", "id": ident, "delta": piece} for piece in cut(rng, text(rng)))
            if rng.random() < 0.8:
                parts.append({"type": f"{shape}-end", "id": ident})
        elif shape == "tool":
            value = {"q": text(rng)}
            parts.append({"type": "tool-input-start", "toolCallId": ident, "toolName": "f"})
            deltas = cut(rng, json.dumps(value, ensure_ascii=rng.random() < 0.5))
            parts.extend({"type": "tool-input-delta", "toolCallId": ident, "inputTextDelta": d} for d in deltas)
            parts.append({"type": "tool-input-available", "toolCallId": ident, "toolName": "f", "input": value})
        elif shape == "tool_whole":
            parts.append(
                {"type": "tool-input-available", "toolCallId": ident, "toolName": "f", "input": {"q": text(rng)}}
            )
        else:
            parts.append({"type": rng.choice(["data-note", "source-url", "x-unknown"]), "data": text(rng), "url": "u"})
    if rng.random() < 0.05:
        parts.append({"type": "error", "errorText": text(rng)})
    parts += [{"type": "finish-step"}, {"type": "finish"}]
    return b"".join(sse(part, rng) for part in parts) + b"data: [DONE]\n\n"


def ui_client(wire: bytes) -> list[str]:
    """Every string useChat can show: each part's deltas joined, every other string of every part."""
    seen: list[str] = []
    joined: dict[str, str] = {}
    fields = {"text-delta": "delta", "reasoning-delta": "delta", "tool-input-delta": "inputTextDelta"}
    for obj in _sse_objects(wire, seen):
        field = fields.get(obj.get("type", "")) if isinstance(obj, dict) else None
        if field is not None and isinstance(obj.get(field), str):
            key = f"{obj['type']}:{obj.get('id', obj.get('toolCallId'))}"
            joined[key] = joined.get(key, "") + obj[field]
            obj = {k: v for k, v in obj.items() if k != field}
        seen.extend(_strings(obj))
    return seen + [_unescaped(value) for value in joined.values()]


def ui_guard(rules: list[BoundRule]) -> Any:
    from guardrail.core.dialect import Framing
    from guardrail.core.dialects.vercel_ui import UIMessageStream
    from guardrail.core.engine import StreamGuard

    return StreamGuard(rules, UIMessageStream(Framing.SSE))


# -- Plain text ---------------------------------------------------------------------------------------


def text_stream(rng: random.Random) -> bytes:
    return text(rng).encode()


def text_client(wire: bytes) -> list[str]:
    return [wire.decode("utf-8", "replace")]


def text_guard(rules: list[BoundRule]) -> Any:
    from guardrail.core.dialects.plain_text import TextStream
    from guardrail.core.engine import StreamGuard

    return StreamGuard(rules, TextStream())


def ollama_guard(rules: list[BoundRule]) -> Any:
    from guardrail.core.dialect import Framing
    from guardrail.core.dialects.ollama import OllamaStream
    from guardrail.core.engine import StreamGuard

    return StreamGuard(rules, OllamaStream(Framing.NDJSON))


def chat_guard(rules: list[BoundRule]) -> Any:
    from guardrail.core.engine import StreamGuard

    return StreamGuard(rules)


def responses_guard(rules: list[BoundRule]) -> Any:
    from guardrail.core.dialect import Framing
    from guardrail.core.dialects.openai_responses import ResponsesStream
    from guardrail.core.engine import StreamGuard

    return StreamGuard(rules, ResponsesStream(Framing.SSE))


def messages_guard(rules: list[BoundRule]) -> Any:
    from guardrail.core.dialect import Framing
    from guardrail.core.dialects.anthropic import MessagesStream
    from guardrail.core.engine import StreamGuard

    return StreamGuard(rules, MessagesStream(Framing.SSE))


# dialect name: (draw a response, read what a client sees, start a guard)
DIALECTS: dict[str, tuple[Generator, Reader, Callable[[list[BoundRule]], Any]]] = {
    "openai_chat": (chat_stream, chat_client, chat_guard),
    "openai_responses": (responses_stream, responses_client, responses_guard),
    "anthropic_messages": (messages_stream, messages_client, messages_guard),
    "ollama": (ollama_stream, ollama_client, ollama_guard),
    "openai_completions": (completions_stream, completions_client, completions_guard),
    "gemini": (gemini_stream, gemini_client, gemini_guard),
    "vercel_ui": (ui_stream, ui_client, ui_guard),
    "text": (text_stream, text_client, text_guard),
}
