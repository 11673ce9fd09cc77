"""StreamGuard: one stream's rules, hold-back and release, driven by bytes in and outputs out.

Theory of operation
-------------------
Bytes from the app go through the SSE decoder and the dialect, which splits each event's text
into channels (a choice's content, refusal, tool-call arguments). Every channel has one checker
per rule. After each piece of text, each checker returns a verdict: the offset before which it
will never object (``safe``) and any final hits. The channel's *release frontier* is the least
``safe`` of the rules that hold back; text before it goes to the client now, text after it is
held. Hits are acted on in the order they start, once no rule can still find an earlier match
(the hit starts before the frontier): ``log`` records, ``redact`` swaps the span for the
replacement, ``abort`` and ``fallback`` release what comes before the hit and end the stream.

An event whose text is released whole, unchanged and in the same delta goes out as its original
bytes; anything held or changed is re-rendered by the dialect. Events without text pass through
at once, except that a finish chunk or ``[DONE]`` first flushes the channels it ends, so text
never moves after the event that closes it.

Time-based rules keep a :class:`~guardrail.core.rule.Timer` per stream. The guard never reads a
clock: the shell passes ``now`` to every call, asks :attr:`StreamGuard.deadline` when to wake it,
and calls :meth:`StreamGuard.expire` then.

After the guard has ended a stream, ``feed`` returns nothing: the shell stops the app.

Continuations
-------------
When a fallback with ``url`` fires, the shell streams another upstream's answer into the same
response. It feeds that answer to a second guard made with ``continuation=True`` and the first
guard's :attr:`StreamGuard.identity`: every chunk is re-rendered with the first stream's ``id``,
``created`` and ``model``, role deltas are dropped (the client already has one), and a rule with
``action: fallback`` acts as ``abort``, so a second trip ends the stream instead of branching again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from guardrail.core.openai_chat import (
    DIALECT,
    Channel,
    ChatRenderer,
    EventKind,
    ParsedEvent,
    carries_something,
    dumps,
    parse,
)
from guardrail.core.outputs import Anomaly, AnomalyKind, Ended, Intervention, Outcome, Output, Released, Send
from guardrail.core.rule import Action, BoundRule, Checker, Fallback, Hit, Rule, TimedRule, Timer, Verdict
from guardrail.core.sse import SSEDecoder, SSEEvent, encode_event
from guardrail.core.tokens import BPEEncoding
from guardrail.exceptions import RuleError, SSEError

# When two hits start at the same offset, the stronger action wins.
_PRECEDENCE = {Action.ABORT: 0, Action.FALLBACK: 0, Action.REDACT: 1, Action.LOG: 2}


class _Trip(Exception):
    """Raised inside a channel when an abort or fallback hit becomes decisive."""

    def __init__(self, rule: BoundRule, released: str) -> None:
        self.rule = rule
        self.released = released


class _ChannelGuard:
    """The rules, held text and release state of one channel."""

    __slots__ = (
        "channel",
        "checkers",
        "finished",
        "held_since",
        "hits",
        "name",
        "pending",
        "received",
        "redacted_until",
        "released",
        "sent",
    )

    def __init__(self, channel: Channel, rules: Sequence[BoundRule]) -> None:
        self.channel = channel
        self.name = str(channel)
        # (rule, checker, holds): shadow-mode (log) rules never hold text back, so that they
        # change neither what the client sees nor when.
        self.checkers: tuple[tuple[BoundRule, Checker, bool], ...] = tuple(
            (rule, cast(Rule, rule.rule).checker(), rule.holdback and rule.action is not Action.LOG)
            for rule in rules
            if rule.checks_text
        )
        self.hits: list[tuple[Hit, BoundRule]] = []
        self.pending = ""  # text from offset `released` on, not yet sent
        self.received = 0
        self.released = 0
        self.redacted_until = -1
        self.held_since: float | None = None
        self.finished = False
        self.sent: list[str] = []  # what reached the client, replacements included

    def feed(self, text: str, *, final: bool, out: list[Output], now: float) -> str:
        """Take ``text`` (and end the channel if ``final``); return the text to release now.

        Raises:
            _Trip: an abort or fallback hit is decisive; it carries the text released before it.
            RuleError: a checker failed.
        """
        held_before = len(self.pending)
        self.pending += text
        self.received += len(text)
        if final:
            self.finished = True
        frontier = self.received
        for rule, checker, holds in self.checkers:
            try:
                verdict: Verdict = checker.finish() if final else checker.feed(text)
                safe, hits = verdict
            except Exception as exc:
                raise RuleError(rule.name, f"{type(exc).__name__}: {exc}") from exc
            if hits:
                self.hits.extend((hit, rule) for hit in hits)
            if holds and safe < frontier and not final:
                frontier = safe
        if frontier == self.received and not self.hits and self.held_since is None:
            # The common case: nothing held before, nothing to act on, all of it safe.
            released, self.pending, self.released = self.pending, "", frontier
            if released:
                self.sent.append(released)
            return released
        released = self._release(frontier, out)
        if released:
            self.sent.append(released)
        self._note_held(held_before, released, out, now)
        return released

    def _release(self, frontier: int, out: list[Output]) -> str:
        parts: list[str] = []
        if self.hits:
            self.hits.sort(key=lambda item: (item[0].start, _PRECEDENCE[item[1].action]))
            while self.hits and self.hits[0][0].start < frontier:
                hit, rule = self.hits.pop(0)
                self._act(hit, rule, parts, out)
        if frontier > self.released:
            parts.append(self._take(frontier))
        return "".join(parts)

    def _take(self, until: int) -> str:
        count = until - self.released
        text, self.pending = self.pending[:count], self.pending[count:]
        self.released = until
        return text

    def _act(self, hit: Hit, rule: BoundRule, parts: list[str], out: list[Output]) -> None:
        leaked = 0 if rule.holdback or rule.action is Action.LOG else max(0, min(hit.end, self.released) - hit.start)
        out.append(Intervention(rule.name, rule.action, self.name, hit.start, hit.end, leaked, hit.detail))
        if rule.action is Action.LOG:
            return
        if hit.start > self.released:
            parts.append(self._take(hit.start))
        if rule.action is not Action.REDACT:
            self.sent.extend(parts)
            raise _Trip(rule, "".join(parts))
        if hit.end <= self.released:
            return
        # Overlapping redactions join into one replacement.
        if not (hit.start < self.released and self.redacted_until == self.released):
            parts.append(rule.replacement)
        stop = min(hit.end, self.received)
        self.pending = self.pending[stop - self.released :]
        self.released = self.redacted_until = stop

    def _note_held(self, held_before: int, released: str, out: list[Output], now: float) -> None:
        if held_before and self.held_since is not None and released:
            out.append(Released(min(held_before, len(released)), self.held_since))
            self.held_since = None
        if self.pending and self.held_since is None:
            self.held_since = now


class StreamGuard:
    """Guards one OpenAI chat completion stream.

    Feed it the response body as it arrives; send the ``Send`` outputs' bytes to the client
    in order; when an ``Ended`` output appears, close the body and stop the app.

    Args:
        rules: the rules that apply to this stream.
        start: when the request started, on the clock the shell passes as ``now``.
        identity: ``id``, ``created`` and ``model`` for chunks the guard writes before the
            stream has sent one of its own (a fallback before the first token).
        continuation: guard another upstream's answer spliced into a stream that ``identity``
            (the first guard's :attr:`identity`) already started: see the module docstring.
        encoding: the tiktoken encoding that counts completion tokens (see
            :meth:`completion_tokens`); None: no counting, no usage chunks.
        include_usage: the client asked for ``stream_options.include_usage``: if the stream ends
            without a usage chunk of its own (cut by the guard, or never sent), the guard adds one
            before ``[DONE]`` whose ``completion_tokens`` counts exactly the text the client got.
        prompt_tokens: the request's prompt tokens, for that usage chunk.
        tokens_before: completion tokens the client received before this stream began (a
            continuation's prefix), counted into that usage chunk.
    """

    dialect = DIALECT

    def __init__(
        self,
        rules: Sequence[BoundRule],
        *,
        start: float = 0.0,
        identity: Mapping[str, Any] | None = None,
        continuation: bool = False,
        encoding: BPEEncoding | None = None,
        include_usage: bool = False,
        prompt_tokens: int | None = None,
        tokens_before: int = 0,
    ) -> None:
        self._rules = tuple(rules)
        self._text_rules = tuple(rule for rule in self._rules if rule.checks_text)
        self._timers: list[tuple[BoundRule, Timer]] = [
            (rule, cast(TimedRule, rule.rule).timer(start)) for rule in self._rules if rule.watches_time
        ]
        self._decoder = SSEDecoder()
        self._renderer = ChatRenderer(identity)
        self._continuation = dict(self._renderer.template) if continuation else None
        self._channels: dict[Channel, _ChannelGuard] = {}
        self._ended = False
        self._reported_unknown = False
        self._encoding = encoding
        self._owe_usage = include_usage and encoding is not None  # until the stream sends its own
        self._prompt_tokens = prompt_tokens or 0
        self._completion_tokens: int | None = None
        self._tokens_before = tokens_before
        self.deltas = 0
        self.first_text_at: float | None = None

    @property
    def ended(self) -> bool:
        """True once the guard has ended the stream (or seen it close)."""
        return self._ended

    @property
    def identity(self) -> dict[str, Any]:
        """The stream's identity as its chunks carry it (``id``, ``object``, ``created``, ``model``...).

        Pass it to the guard of a continuation, so that its chunks join this stream.
        """
        return dict(self._renderer.template)

    def completion_tokens(self) -> int | None:
        """Tokens of the text the client received so far, every channel's counted on its own.

        The text is encoded once per call (at the end of a stream, not per delta); None
        without an encoding.
        """
        if self._encoding is None:
            return None
        if self._completion_tokens is None or not self._ended:
            encode = self._encoding.encode_ordinary
            self._completion_tokens = sum(len(encode("".join(c.sent))) for c in self._channels.values())
        return self._completion_tokens

    def sent_text(self) -> dict[str, str]:
        """The text the client received so far, by channel name."""
        return {name: text for name, text in ((c.name, "".join(c.sent)) for c in self._channels.values()) if text}

    @property
    def timed(self) -> bool:
        """Whether any rule of this stream watches time (and so may have deadlines)."""
        return bool(self._timers)

    @property
    def deadline(self) -> float | None:
        """When the shell should call :meth:`expire` next; None if no time-based rule is armed."""
        if self._ended:
            return None
        earliest = None
        for _, timer in self._timers:
            due = timer.deadline()
            if due is not None and (earliest is None or due < earliest):
                earliest = due
        return earliest

    def expire(self, now: float) -> list[Output]:
        """Let time-based rules look at the clock; end the stream if one of their limits has passed."""
        if self._ended:
            return []
        out: list[Output] = []
        wire: list[bytes] = []
        for rule, timer in self._timers:
            code = timer.expired(now)
            if code is None:
                continue
            out.append(Intervention(rule.name, rule.action, "stream", 0, 0, 0, code))
            if rule.action is Action.LOG:
                continue
            if self._release_held(now, wire, out):
                self._time_out(rule, code, wire, out)
            break
        return self._flush(wire, out)

    def feed(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> list[Output]:
        """Take the next bytes of the body; return what to do about them, in order.

        ``data`` may also be a ``bytearray`` or ``memoryview`` (Starlette's ``StreamingResponse``
        passes memoryviews through); it is copied, so reusing the buffer afterwards is safe. An
        event passed through whole goes out as the very ``bytes`` object that brought it.

        Never raises for bad input: malformed or oversized events and failing rules end the
        stream with an in-dialect error event and an ``Anomaly``.
        """
        if self._ended:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        out: list[Output] = []
        wire: list[bytes] = []
        try:
            events = self._decoder.feed(data)
        except SSEError as exc:
            self._fail(AnomalyKind.OVERSIZED_EVENT, str(exc), "event_too_large", wire, out)
            return self._flush(wire, out)
        for event in events:
            try:
                self._handle(event, now, wire, out)
            except _Trip as trip:
                self._trip(trip, wire, out)
            except RuleError as exc:
                self._fail(AnomalyKind.RULE_ERROR, str(exc), "rule_error", wire, out)
            if self._ended:
                break
        return self._flush(wire, out)

    def close(self, now: float = 0.0) -> list[Output]:
        """The body is complete: release what is still held (if it is safe) and finish."""
        if self._ended:
            return []
        out: list[Output] = []
        wire: list[bytes] = []
        try:
            for event in self._decoder.close():
                wire.append(event.raw)  # only ever the LF of a CRLF split across the last chunks
        except SSEError:
            pass  # already reported when it was raised
        if self._decoder.discarded:
            out.append(
                Anomaly(
                    AnomalyKind.UNTERMINATED_EVENT,
                    f"{self._decoder.discarded} bytes after the last complete event were dropped",
                    ended_stream=False,
                )
            )
        if self._release_held(now, wire, out):
            self._pay_usage(wire)  # a stream that ended without [DONE] still gets its usage
            self._ended = True
            out.append(Ended(Outcome.COMPLETED))
        return self._flush(wire, out)

    def upstream_failed(self, detail: str, now: float = 0.0) -> list[Output]:
        """The app or upstream failed mid-stream: release what is safe, then end with an error event.

        The openai SDK raises ``APIError`` for the event, rather than a connection error.
        """
        if self._ended:
            return []
        out: list[Output] = []
        wire: list[bytes] = []
        if self._release_held(now, wire, out):
            self._ended = True
            message = f"the upstream stream failed: {detail}"
            wire.append(self._renderer.error(message, type="upstream_error", code="upstream_error"))
            out.append(Ended(Outcome.UPSTREAM_ERROR))
        return self._flush(wire, out)

    def abort(self, now: float = 0.0) -> list[Output]:
        """End the stream now, as an ``abort`` rule would.

        What is safe is released, every open choice finishes with ``content_filter``, then
        ``[DONE]``. For a shell that cannot go on, such as one whose url fallback did not answer.

        Returns:
            The outputs, ending with ``Ended(Outcome.ABORTED)`` (or with what ended the stream
            if releasing the held text tripped a rule); nothing if the stream has already ended.
        """
        if self._ended:
            return []
        out: list[Output] = []
        wire: list[bytes] = []
        if self._release_held(now, wire, out):
            self._ended = True
            wire.append(self._renderer.finish("content_filter"))
            self._pay_usage(wire)
            wire.append(self._renderer.done())
            out.append(Ended(Outcome.ABORTED))
        return self._flush(wire, out)

    # -- events ---------------------------------------------------------------------------

    def _handle(self, event: SSEEvent, now: float, wire: list[bytes], out: list[Output]) -> None:
        parsed = parse(event)
        if self._owe_usage and parsed.obj is not None and parsed.obj.get("usage"):
            self._owe_usage = False  # the stream's own usage chunk passes through unchanged
        if self._continuation is not None:
            adopted = _adopt(parsed, self._continuation)
            if adopted is None:
                return
            parsed = adopted
        kind = parsed.kind
        if kind is EventKind.CHUNK:
            self._renderer.observe(parsed)
            self._handle_chunk(parsed, now, wire, out)
        elif kind is EventKind.PASS:
            self._renderer.observe(parsed)
            wire.append(event.raw)
        elif kind is EventKind.DONE:
            self._flush_channels(self._channels.values(), now, wire, out)
            self._pay_usage(wire)
            wire.append(event.raw)
        elif kind is EventKind.ERROR:
            self._flush_channels(self._channels.values(), now, wire, out)
            wire.append(event.raw)
        elif kind is EventKind.UNKNOWN:
            if not self._reported_unknown:
                self._reported_unknown = True
                out.append(Anomaly(AnomalyKind.UNKNOWN_EVENT, "an event that is not a chat completion chunk", False))
            wire.append(event.raw)
        else:
            self._fail(AnomalyKind.MALFORMED_EVENT, "an event whose data is not JSON", "malformed_event", wire, out)

    def _handle_chunk(self, parsed: ParsedEvent, now: float, wire: list[bytes], out: list[Output]) -> None:
        texts: dict[int, str] = {}
        whole = True
        finishing = set(parsed.finished)
        try:
            for number, piece in enumerate(parsed.pieces):
                channel = self._channel(piece.channel)
                final = piece.channel.choice in finishing
                self.deltas += 1  # checked by every rule, even if it trips one
                released = channel.feed(piece.text, final=final, out=out, now=now)
                for _, timer in self._timers:
                    timer.content(now)
                texts[number] = released
                whole = whole and released == piece.text
        except _Trip as trip:
            texts[number] = trip.released
            rewritten = self._renderer.rewrite(parsed, texts, keep_finish=False)
            if rewritten is not None:
                wire.append(rewritten)
            trip.released = ""
            raise
        if finishing:
            fed = {piece.channel for piece in parsed.pieces}
            closing = [c for c in self._channels.values() if c.channel.choice in finishing and c.channel not in fed]
            self._flush_channels(closing, now, wire, out)
        if whole:
            wire.append(parsed.event.raw)
        else:
            rewritten = self._renderer.rewrite(parsed, texts)
            if rewritten is not None:
                wire.append(rewritten)
        if self.first_text_at is None and any(texts.values()):
            self.first_text_at = now

    def _release_held(self, now: float, wire: list[bytes], out: list[Output]) -> bool:
        """End every channel: what was held only because more text might complete a match is safe now.

        Returns False if that ended the stream instead (a pending match turned out final and
        tripped its rule, or a rule failed).
        """
        try:
            self._flush_channels(self._channels.values(), now, wire, out)
        except _Trip as trip:
            self._trip(trip, wire, out)
            return False
        except RuleError as exc:
            self._fail(AnomalyKind.RULE_ERROR, str(exc), "rule_error", wire, out)
            return False
        return True

    def _channel(self, channel: Channel) -> _ChannelGuard:
        guard = self._channels.get(channel)
        if guard is None or guard.finished:  # text after a finish starts the channel afresh
            guard = self._channels[channel] = _ChannelGuard(channel, self._text_rules)
        return guard

    def _flush_channels(
        self, channels: Iterable[_ChannelGuard], now: float, wire: list[bytes], out: list[Output]
    ) -> None:
        for channel in list(channels):
            if channel.finished:
                continue
            try:
                released = channel.feed("", final=True, out=out, now=now)
            except _Trip as trip:
                if trip.released:
                    wire.append(self._renderer.text(channel.channel, trip.released))
                    trip.released = ""
                raise
            if released:
                wire.append(self._renderer.text(channel.channel, released))
                if self.first_text_at is None:
                    self.first_text_at = now

    # -- endings --------------------------------------------------------------------------

    def _trip(self, trip: _Trip, wire: list[bytes], out: list[Output]) -> None:
        rule = trip.rule
        self._ended = True
        if self._fall_back(rule, Outcome.FALLBACK, wire, out):
            return
        wire.append(self._renderer.finish(_stop_reason(rule)))
        self._pay_usage(wire)
        wire.append(self._renderer.done())
        out.append(Ended(Outcome.ABORTED, rule.name))

    def _time_out(self, rule: BoundRule, code: str, wire: list[bytes], out: list[Output]) -> None:
        self._ended = True
        if self._fall_back(rule, Outcome.TIMEOUT, wire, out):
            return
        message = f"guardrail ended the stream: {_TIMEOUT_MESSAGES.get(code, code)} (rule {rule.name!r})"
        wire.append(self._renderer.error(message, type="timeout", code=code))
        out.append(Ended(Outcome.TIMEOUT, rule.name))

    def _fall_back(self, rule: BoundRule, outcome: Outcome, wire: list[bytes], out: list[Output]) -> bool:
        """End with the rule's fallback if it has one: stream its text, or hand its url to the shell."""
        fallback = self._fallback_of(rule)
        if rule.action is not Action.FALLBACK or fallback is None:
            return False
        if fallback.url is not None:
            out.append(Ended(outcome, rule.name, fallback))  # the shell streams the other upstream
            return True
        if fallback.text is None:
            return False
        wire.append(self._fallback_text(fallback.text))
        self._pay_usage(wire)
        wire.append(self._renderer.done())
        out.append(Ended(outcome, rule.name))
        return True

    def _fallback_text(self, text: str) -> bytes:
        # The fallback answer continues every open choice's content: the client receives it there.
        for index in list(self._renderer.open_choices) or [0]:
            channel = Channel(index, "content")
            guard = self._channels.get(channel)  # finished or not: its text goes on here
            if guard is None:
                guard = self._channels[channel] = _ChannelGuard(channel, self._text_rules)
            guard.sent.append(text)
        return self._renderer.fallback(text)

    def _pay_usage(self, wire: list[bytes]) -> None:
        if self._owe_usage:
            self._owe_usage = False
            completion = self._tokens_before + (self.completion_tokens() or 0)
            wire.append(self._renderer.usage(self._prompt_tokens, completion))

    def _fallback_of(self, rule: BoundRule) -> Fallback | None:
        # A continuation is already the fallback: a second trip aborts rather than branching again.
        return None if self._continuation is not None else rule.fallback

    def _fail(self, kind: AnomalyKind, detail: str, code: str, wire: list[bytes], out: list[Output]) -> None:
        self._ended = True
        out.append(Anomaly(kind, detail, ended_stream=True))
        wire.append(self._renderer.error(f"guardrail ended the stream: {detail}", type="guardrail_error", code=code))
        outcome = Outcome.UPSTREAM_ERROR if kind is not AnomalyKind.RULE_ERROR else Outcome.ABORTED
        out.append(Ended(outcome))

    @staticmethod
    def _flush(wire: list[bytes], out: list[Output]) -> list[Output]:
        # One piece, nearly always an event passed through whole, goes out as the very bytes that came in.
        data = wire[0] if len(wire) == 1 else b"".join(wire)
        if data:
            # Ended, if present, comes last: the bytes before it still go out.
            if out and isinstance(out[-1], Ended):
                out.insert(len(out) - 1, Send(data))
            else:
                out.append(Send(data))
        return out


_TIMEOUT_MESSAGES = {
    "idle_timeout": "the model sent no text for too long",
    "first_token_timeout": "the model took too long to start answering",
    "total_timeout": "the answer took too long",
}


def _stop_reason(rule: BoundRule) -> str:
    reason = getattr(rule.rule, "stop_reason", "content_filter")
    return reason if isinstance(reason, str) else "content_filter"


def _adopt(parsed: ParsedEvent, identity: Mapping[str, Any]) -> ParsedEvent | None:
    """A continuation's event as the first stream would carry it: its identity, and no role delta.

    Returns None for an event left with nothing to say (the continuation's own role chunk).
    """
    obj = parsed.obj
    if obj is None or parsed.kind not in (EventKind.CHUNK, EventKind.PASS):
        return parsed
    adopted = {**obj, **identity}
    choices = adopted.get("choices")
    dropped_role = False
    for choice in choices if isinstance(choices, list) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.pop("role", None) is not None:
            dropped_role = True
    said = isinstance(choices, list) and any(carries_something(choice) for choice in choices)
    if dropped_role and parsed.kind is EventKind.PASS and not adopted.get("usage") and not said:
        return None
    data = dumps(adopted)
    return parse(SSEEvent(encode_event(data), data))
