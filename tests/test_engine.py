"""StreamGuard, driven byte by byte with no server: hold-back, actions, flushing and bad input."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import regex
from hypothesis import HealthCheck, given, settings, strategies as st

from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Anomaly, AnomalyKind, Ended, Intervention, Outcome, Output, Released, Send
from guardrail.core.rule import Action, BoundRule, Fallback, Hit, Verdict
from guardrail.rules.banned import BannedPatterns

KEY_PATTERN = r"(?<![A-Za-z0-9])sk-[A-Za-z0-9]{20,}"
PHRASE = "project starlight"
BANNED = BannedPatterns(patterns=[KEY_PATTERN], phrases=[PHRASE])
# What the guard must find, written as a plain whole-text regex (the phrase's documented meaning).
BATCH = regex.compile(KEY_PATTERN + r"|(?i:(?<!\w)project\s+starlight(?!\w))")


def chunk(content: str | None = None, *, index: int = 0, finish: str | None = None, **delta: Any) -> bytes:
    if content is not None:
        delta["content"] = content
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def answer_stream(pieces: Sequence[str]) -> list[bytes]:
    return [chunk("", role="assistant"), *(chunk(p) for p in pieces), chunk(finish="stop"), DONE]


@dataclass
class ClientView:
    """What an SDK client makes of the bytes: text per channel, finish reasons, errors, [DONE]."""

    text: dict[str, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def content(self) -> str:
        return self.text.get("0.content", "")


def view(wire: bytes) -> ClientView:
    seen = ClientView()
    for block in wire.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line for line in block.decode().split("\n") if line]
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        if not lines:
            continue
        if not data:
            seen.events.append(lines[0])
            continue
        seen.events.append(data)
        if data == "[DONE]":
            seen.done = True
            continue
        obj = json.loads(data)
        if "error" in obj:
            seen.errors.append(obj["error"])
            continue
        for choice in obj.get("choices", []):
            delta = choice.get("delta") or {}
            for key in ("content", "refusal"):
                if delta.get(key):
                    name = f"{choice['index']}.{key}"
                    seen.text[name] = seen.text.get(name, "") + delta[key]
            for call in delta.get("tool_calls") or []:
                name = f"{choice['index']}.tool{call['index']}"
                seen.text[name] = seen.text.get(name, "") + call["function"].get("arguments", "")
            if choice.get("finish_reason"):
                seen.finish[choice["index"]] = choice["finish_reason"]
    return seen


def run(rules: Sequence[BoundRule], parts: Sequence[bytes]) -> tuple[bytes, list[Output]]:
    guard = StreamGuard(rules)
    outputs: list[Output] = []
    for now, part in enumerate(parts):
        outputs += guard.feed(part, float(now))
    outputs += guard.close(float(len(parts)))
    wire = b"".join(o.data for o in outputs if isinstance(o, Send))
    return wire, [o for o in outputs if not isinstance(o, Send)]


def split(text: str, cuts: Sequence[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


filler = st.text(alphabet="abcdeiklnoprstuy -.,\n", max_size=60)
banned_item = st.sampled_from(
    [
        "sk-" + "A1b2C3d4E5f6G7h8I9j0kL",
        "sk-" + "x" * 40,
        "Project Starlight",
        "project   starlight",
        "PROJECT\nSTARLIGHT",
    ]
)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=filler,
    first=banned_item,
    middle=filler,
    second=banned_item,
    after=filler,
    cuts=st.one_of(st.lists(st.integers(0, 400), max_size=40), st.just(list(range(400)))),
)
def test_abort_releases_exactly_the_text_before_the_first_match(
    before: str, first: str, middle: str, second: str, after: str, cuts: list[int]
) -> None:
    text = f"{before} {first} {middle} {second} {after}"
    expected_match = BATCH.search(text)
    assert expected_match is not None
    rule = BoundRule("banned", BANNED, Action.ABORT)
    wire, others = run([rule], answer_stream(split(text, cuts)))
    client = view(wire)
    assert client.content == text[: expected_match.start()]
    assert client.finish == {0: "content_filter"}
    assert client.done
    assert others[-1] == Ended(Outcome.ABORTED, "banned")


def test_one_character_per_delta_never_shows_any_part_of_the_key() -> None:
    text = "The key is sk-" + "Q" * 24 + " and that is all."
    guard = StreamGuard([BoundRule("banned", BANNED, Action.ABORT)])
    wire = b""
    for part in answer_stream(list(text)):
        for output in guard.feed(part):
            if isinstance(output, Send):
                wire += output.data
        assert "sk" not in view(wire).content
        assert text.startswith(view(wire).content)
    assert view(wire).content == "The key is "


@settings(max_examples=300, deadline=None)
@given(before=filler, first=banned_item, middle=filler, second=banned_item, cuts=st.lists(st.integers(0, 300)))
def test_redact_replaces_every_match_however_the_stream_is_chunked(
    before: str, first: str, middle: str, second: str, cuts: list[int]
) -> None:
    text = f"{before} {first} {middle} {second}."
    rule = BoundRule("banned", BANNED, Action.REDACT, replacement="[gone]")
    wire, _ = run([rule], answer_stream(split(text, cuts)))
    client = view(wire)
    assert client.content == BATCH.sub("[gone]", text)
    assert client.finish == {0: "stop"}


def test_text_that_cannot_start_a_match_is_released_in_the_same_delta() -> None:
    guard = StreamGuard([BoundRule("banned", BANNED, Action.ABORT)])
    guard.feed(chunk("", role="assistant"))
    for piece in ["Hello", " world,", " how are", " you?"]:
        sent = b"".join(o.data for o in guard.feed(chunk(piece)) if isinstance(o, Send))
        assert view(sent).content == piece
        assert sent == chunk(piece)  # the original bytes


def test_an_event_released_whole_goes_out_as_the_same_bytes_object() -> None:
    guard = StreamGuard([BoundRule("banned", BANNED, Action.ABORT)])
    guard.feed(chunk("", role="assistant"))
    event = chunk("Hello there")
    (output,) = guard.feed(event)
    assert isinstance(output, Send) and output.data is event


def test_buffers_other_than_bytes_are_taken_as_their_bytes_and_may_be_reused() -> None:
    """Starlette's StreamingResponse passes memoryviews through; a socket reader reuses its buffer."""
    guard = StreamGuard([BoundRule("banned", BANNED, Action.REDACT, replacement="[gone]")])
    buffer = bytearray(1024)
    sent: list[bytes] = []
    events = [chunk("", role="assistant"), chunk("Plain text, "), chunk("sk-" + "A1b2" * 6), chunk(" done."), DONE]
    for number, event in enumerate(events):
        buffer[: len(event)] = event
        data = memoryview(buffer)[: len(event)] if number % 2 else bytearray(buffer[: len(event)])
        outputs = guard.feed(data)
        assert all(type(output.data) is bytes for output in outputs if isinstance(output, Send))
        sent += [output.data for output in outputs if isinstance(output, Send)]
        buffer[:] = b"x" * len(buffer)  # the buffer is reused: what was sent must not change with it
        if isinstance(data, bytearray):
            data[:] = b"x" * len(data)
    client = view(b"".join(sent))
    assert client.content == "Plain text, [gone] done."
    assert client.done


def test_a_possible_match_start_is_held_until_the_next_delta_rules_it_out() -> None:
    guard = StreamGuard([BoundRule("banned", BANNED, Action.ABORT)])
    held = [o for o in guard.feed(chunk("It is project")) if isinstance(o, Send)]
    assert view(held[0].data).content == "It is "
    outputs = guard.feed(chunk(" plans, not secrets"), now=2.5)
    assert view(b"".join(o.data for o in outputs if isinstance(o, Send))).content == "project plans, not secrets"
    assert Released(len("project"), 0.0) in outputs


def test_held_text_is_flushed_before_the_finish_chunk() -> None:
    parts = [chunk("", role="assistant"), chunk("ask the project"), chunk(finish="stop"), DONE]
    wire, others = run([BoundRule("banned", BANNED, Action.ABORT)], parts)
    client = view(wire)
    assert client.content == "ask the project"
    project_at = next(i for i, event in enumerate(client.events) if "project" in event)
    finish_at = next(i for i, event in enumerate(client.events) if '"finish_reason": "stop"' in event)
    assert project_at < finish_at
    assert others[-1] == Ended(Outcome.COMPLETED)


def test_held_text_is_flushed_when_the_body_ends_without_done() -> None:
    wire, _ = run([BoundRule("banned", BANNED, Action.ABORT)], [chunk("see the project")])
    assert view(wire).content == "see the project"
    assert not view(wire).done


def test_no_rule_firing_keeps_every_event_and_byte() -> None:
    parts = [
        chunk("", role="assistant"),
        b": keep-alive\n\n",
        chunk("Plain"),
        chunk(" answer."),
        chunk(finish="stop"),
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n',
        DONE,
    ]
    wire, others = run([BoundRule("banned", BANNED, Action.ABORT)], parts)
    assert wire == b"".join(parts)
    assert others == [Ended(Outcome.COMPLETED)]


def test_log_records_the_hit_and_changes_nothing() -> None:
    parts = answer_stream(["Use sk-", "A" * 25, " now."])
    wire, others = run([BoundRule("shadow", BANNED, Action.LOG)], parts)
    assert wire == b"".join(parts)
    assert [o.rule for o in others if isinstance(o, Intervention)] == ["shadow"]


def test_fallback_streams_its_text_and_ends_cleanly() -> None:
    rule = BoundRule("banned", BANNED, Action.FALLBACK, fallback=Fallback("sorry", text="I can't share that."))
    wire, others = run([rule], answer_stream(["Sure: sk-", "B" * 30, " there."]))
    client = view(wire)
    assert client.content == "Sure: \n\nI can't share that."  # the fallback's separator: a blank line
    assert client.finish == {0: "stop"}
    assert client.done
    assert others[-1] == Ended(Outcome.FALLBACK, "banned")


def test_url_fallback_hands_the_branch_to_the_shell() -> None:
    backup = Fallback("backup", url="http://127.0.0.1:9/v1/chat/completions", model="other")
    rule = BoundRule("banned", BANNED, Action.FALLBACK, fallback=backup)
    wire, others = run([rule], answer_stream(["Sure: sk-", "B" * 30, " there."]))
    assert view(wire).content == "Sure: "
    assert not view(wire).done
    assert others[-1] == Ended(Outcome.FALLBACK, "banned", backup)


def test_every_open_choice_is_finished_on_abort() -> None:
    parts = [
        chunk("", index=0, role="assistant"),
        chunk("", index=1, role="assistant"),
        chunk("First answer", index=0),
        chunk("Second: sk-" + "C" * 22 + " ok", index=1),
    ]
    wire, _ = run([BoundRule("banned", BANNED, Action.ABORT)], parts)
    client = view(wire)
    assert client.text == {"0.content": "First answer", "1.content": "Second: "}
    assert client.finish == {0: "content_filter", 1: "content_filter"}


def test_tool_call_arguments_and_refusals_are_guarded() -> None:
    call_start = chunk(
        index=0,
        tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}],
    )
    parts = [
        chunk(None, role="assistant"),
        call_start,
        chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"token": "sk-'}}]),
        chunk(tool_calls=[{"index": 0, "function": {"arguments": "D" * 24 + '"}'}}]),
        chunk(refusal="I refuse: Project Starlight."),
        chunk(finish="tool_calls"),
        DONE,
    ]
    wire, _ = run([BoundRule("banned", BANNED, Action.REDACT)], parts)
    client = view(wire)
    assert client.text["0.tool0"] == '{"token": "[redacted]"}'
    assert client.text["0.refusal"] == "I refuse: [redacted]."
    assert '"id": "call_1"' in wire.decode() or '"id":"call_1"' in wire.decode()


def test_overlapping_redactions_become_one_replacement() -> None:
    keys = BoundRule("keys", BannedPatterns(patterns=[r"sk-[a-z]{6}"]), Action.REDACT)
    words = BoundRule("words", BannedPatterns(patterns=[r"[a-z]{4}xyz"]), Action.REDACT)
    wire, others = run([keys, words], answer_stream(["a sk-abcdefxyz b"]))
    assert view(wire).content == "a [redacted] b"
    assert sorted(o.rule for o in others if isinstance(o, Intervention)) == ["keys", "words"]


class _LateRule:
    """Releases everything at once and reports the word "late" after the fact."""

    def checker(self) -> _LateChecker:
        return _LateChecker()


class _LateChecker:
    def __init__(self) -> None:
        self.text = ""

    def feed(self, text: str) -> Verdict:
        self.text += text
        return Verdict(len(self.text))

    def finish(self) -> Verdict:
        start = self.text.find("late")
        hits = (Hit(start, start + 4, "late"),) if start >= 0 else ()
        return Verdict(len(self.text), hits)


def test_rules_without_holdback_count_the_characters_that_leaked() -> None:
    rule = BoundRule("after", _LateRule(), Action.ABORT, holdback=False)
    wire, others = run([rule], answer_stream(["too ", "late now"]))
    assert view(wire).content == "too late now"
    hit = next(o for o in others if isinstance(o, Intervention))
    assert hit.leaked == 4


class _BrokenRule:
    def checker(self) -> _BrokenChecker:
        return _BrokenChecker()


class _BrokenChecker:
    def feed(self, text: str) -> Verdict:
        raise ZeroDivisionError("oops")

    def finish(self) -> Verdict:
        return Verdict(0)


def test_a_failing_rule_ends_the_stream_with_an_error_event() -> None:
    wire, others = run([BoundRule("broken", _BrokenRule(), Action.ABORT)], answer_stream(["hello"]))
    client = view(wire)
    assert client.content == ""
    assert client.errors[0]["code"] == "rule_error"
    assert "broken" in client.errors[0]["message"]
    assert any(isinstance(o, Anomaly) and o.kind is AnomalyKind.RULE_ERROR for o in others)


def test_malformed_json_ends_the_stream_with_an_error_event() -> None:
    parts = [chunk("fine so far"), b"data: {not json\n\n", chunk("never seen")]
    wire, others = run([BoundRule("banned", BANNED, Action.ABORT)], parts)
    client = view(wire)
    assert client.content == "fine so far"
    assert client.errors[0]["code"] == "malformed_event"
    assert others[-1] == Ended(Outcome.UPSTREAM_ERROR)


def test_an_oversized_event_ends_the_stream_with_an_error_event() -> None:
    parts = [chunk("ok"), b"data: " + b"x" * (1 << 20) + b"\n"]
    wire, others = run([BoundRule("banned", BANNED, Action.ABORT)], parts)
    assert view(wire).errors[0]["code"] == "event_too_large"
    assert any(isinstance(o, Anomaly) and o.kind is AnomalyKind.OVERSIZED_EVENT for o in others)


def test_unknown_event_shapes_pass_through_and_are_reported_once() -> None:
    odd = b'data: {"prompt_filter_results": []}\n\n'
    parts = [odd, odd, *answer_stream(["hi"])]
    wire, others = run([BoundRule("banned", BANNED, Action.ABORT)], parts)
    assert wire == b"".join(parts)
    assert [o.kind for o in others if isinstance(o, Anomaly)] == [AnomalyKind.UNKNOWN_EVENT]


def test_an_unterminated_final_event_is_dropped_and_reported() -> None:
    finish = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    wire, others = run([BoundRule("banned", BANNED, Action.ABORT)], [chunk("hi"), finish, b"data: {}"])
    assert wire == chunk("hi") + finish
    assert [o.kind for o in others if isinstance(o, Anomaly)] == [AnomalyKind.UNTERMINATED_EVENT]


def test_a_stream_cut_short_ends_with_an_error_naming_the_truncation() -> None:
    wire, others = run([BoundRule("banned", BANNED, Action.ABORT)], [chunk("hi")])
    error = json.loads(wire.removeprefix(chunk("hi")).decode().removeprefix("data: "))["error"]
    assert error["code"] == "upstream_truncated" and error["type"] == "upstream_error"
    assert [o.kind for o in others if isinstance(o, Anomaly)] == [AnomalyKind.TRUNCATED_STREAM]
    assert [o.outcome for o in others if isinstance(o, Ended)] == [Outcome.UPSTREAM_ERROR]


def test_korean_split_inside_characters_arrives_intact_and_phrases_are_redacted() -> None:
    rule = BoundRule("korean", BannedPatterns(phrases=["비밀 번호"]), Action.REDACT)
    text = "안녕하세요. 제 비밀 번호 는 알려드릴 수 없어요."
    body = b"".join(answer_stream([text[:9], text[9:]]))
    parts = [body[i : i + 7] for i in range(0, len(body), 7)]  # 7 never lines up with 3-byte characters
    wire, _ = run([rule], parts)
    assert view(wire).content == "안녕하세요. 제 [redacted] 는 알려드릴 수 없어요."


def test_feed_after_the_end_returns_nothing() -> None:
    guard = StreamGuard([BoundRule("banned", BANNED, Action.ABORT)])
    assert any(isinstance(o, Ended) for o in guard.feed(chunk("sk-" + "E" * 30 + " and then some")))
    assert guard.feed(chunk("more")) == []
    assert guard.close() == []


def test_fallback_text_starts_after_a_separator_only_when_the_client_has_text() -> None:
    def client_text(separator: str | None, pieces: list[str]) -> str:
        fallback = Fallback("sorry", text="I can't talk about that.")
        if separator is not None:
            fallback = Fallback("sorry", text="I can't talk about that.", separator=separator)
        wire, _ = run([BoundRule("banned", BANNED, Action.FALLBACK, fallback=fallback)], answer_stream(pieces))
        return view(wire).content

    cut = ["The plan is called", " Project Starlight."]
    assert client_text(None, cut) == "The plan is called \n\nI can't talk about that."
    assert client_text("", cut) == "The plan is called I can't talk about that."
    assert client_text(" — ", cut) == "The plan is called  — I can't talk about that."
    assert client_text(None, ["Project Starlight."]) == "I can't talk about that."  # nothing before it


def test_a_failing_rule_is_named_to_the_client_but_its_message_is_not() -> None:
    from guardrail.core.rule import Verdict

    class Quoting:
        """A plugin whose error quotes the text it was checking."""

        def checker(self) -> Quoting:
            return self

        def feed(self, text: str) -> Verdict:
            raise ValueError(f"cannot judge {text!r}")

        def finish(self) -> Verdict:
            return Verdict(0, ())

    wire, others = run([BoundRule("quoting", Quoting(), Action.ABORT)], answer_stream(["my secret plan"]))
    assert b"secret plan" not in wire and b"rule 'quoting' failed" in wire
    (anomaly,) = [o for o in others if isinstance(o, Anomaly)]
    assert "secret plan" in anomaly.detail  # for the operator's logs (at DEBUG), never the client


def test_a_dialect_that_fails_to_write_its_ending_never_makes_the_guard_raise() -> None:
    from guardrail.core.dialects.openai_chat import ChatStream

    class Broken(ChatStream):
        def end(self, *args: Any, **kwargs: Any) -> bytes:
            raise RuntimeError("cannot write")

    guard = StreamGuard([BoundRule("banned", BANNED, Action.ABORT)], Broken())
    outputs = guard.feed(b"".join(answer_stream(["Hello", " there"]))[:-14]) + guard.close() + guard.abort()
    assert any(isinstance(o, Ended) for o in outputs)


def test_strings_outside_channels_are_checked_whenever_they_are_new_whatever_came_before() -> None:
    """An id or model is checked once per stream, but a new one is always checked.

    Events repeat their strings, drop some, bring them back, then bring a banned one: each
    change of the set is read again, and the banned model ends the stream before its event.
    """
    key = "sk-" + "A" * 24

    def event(text: str, **identity: str) -> bytes:
        obj = {**identity, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    parts = [
        event("One ", id="c1", model="m"),
        event("two ", id="c1", model="m"),
        event("three ", id="c1"),
        event("four ", id="c1", model="m"),
        event("five ", id="c1", model="m", system_fingerprint="fp"),
        event("six ", id="c1", model=key),
        event("seven ", id="c1", model="m"),
    ]
    wire, outputs = run([BoundRule("banned", BANNED, Action.REDACT)], parts)
    assert key not in wire.decode()
    assert view(wire).content == "One two three four five "
    assert [(o.rule, o.channel) for o in outputs if isinstance(o, Intervention)] == [("banned", "event")]
