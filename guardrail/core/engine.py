"""StreamGuard: one stream's rules, hold-back and release, driven by bytes in and outputs out.

Theory of operation
-------------------
The body's bytes are cut into frames by the dialect's framing (SSE, NDJSON, one whole JSON
body) and read by its :class:`~guardrail.core.dialect.DialectStream` into channel pieces. Every
channel has one checker per rule. After each piece of text, each checker returns a verdict: the
offset before which it will never object (``safe``) and any final hits. The channel's *release
frontier* is the least ``safe`` of the rules that hold back; text before it goes to the client
now, text after it is held. Hits are acted on in the order they start, once no rule can still
find an earlier match (the hit starts before the frontier): ``log`` records, ``redact`` swaps
the span for the replacement, ``abort`` and ``fallback`` release what comes before the hit and
end the stream.

A piece and the end of its channel are two steps: text is always fed, then finished. A frame
that *ends* channels releases their held text (re-rendered into it, or just before it); a frame
that *waits* for channels (a chat finish chunk) goes out once they hold nothing, and text that
still follows continues them. Strings outside channels (ids, comments, error messages) are
checked whole; a match there ends the stream, since they cannot be cut.

A frame whose text is released whole and unchanged goes out as its original bytes; anything
held or changed is re-rendered by the dialect, which also writes every ending (a policy or
length stop, fallback text, an error) in its own terms. The engine knows no provider. A body
that ends before its dialect's own end (no finish, no end event) was cut short: the guard ends
it with an error (``upstream_truncated``), so that no client takes half an answer for a whole.

Time-based rules keep a :class:`~guardrail.core.rule.Timer` per stream. The guard never reads a
clock: the shell passes ``now`` to every call, asks :attr:`StreamGuard.deadline` when to wake it,
and calls :meth:`StreamGuard.expire` then.

After the guard has ended a stream, ``feed`` returns nothing: the shell stops the app.

Continuations
-------------
When a fallback with ``url`` fires, the shell streams another upstream's answer into the same
response, through a second guard made with ``continuation=True`` and the dialect's continuation
stream (which re-labels the answer as the first stream's), given the text the client already
has (``text_before``) so that usage counts the whole answer. A rule with ``action: fallback``
acts as ``abort`` there, so a second trip ends the stream instead of branching again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple, cast

from mypy_extensions import mypyc_attr

from guardrail.core.dialect import (
    DialectStream,
    Ending,
    EventKind,
    Fail,
    FallbackText,
    Framing,
    Kind,
    Parsed,
    Stop,
    StopReason,
)
from guardrail.core.dialects import default_stream
from guardrail.core.framing import frames_for
from guardrail.core.outputs import Anomaly, AnomalyKind, Ended, Intervention, Outcome, Output, Released, Send
from guardrail.core.rule import Action, BoundRule, Checker, Hit, Rule, TimedRule, Timer, Verdict
from guardrail.core.textlog import TextLog
from guardrail.core.tokens import BPEEncoding
from guardrail.exceptions import RuleError, SSEError
from guardrail.rules.textview import JsonTextChecker

# Characters of sent text before a cut that the check of the cut sees (for lookbehinds).
_EDGE_CONTEXT = 256

# The run of text that ends the released text, when it is not whitespace.
_GLUED = re.compile(r"\S+\Z")

# When two hits start at the same offset, the stronger action wins.
_PRECEDENCE = {Action.ABORT: 0, Action.FALLBACK: 0, Action.REDACT: 1, Action.LOG: 2}


class _Trip(Exception):
    """Raised inside a channel when an abort or fallback hit becomes decisive."""

    def __init__(self, rule: BoundRule, released: str, channel: str) -> None:
        self.rule = rule
        self.released = released
        self.channel = channel


class _Unreadable(Exception):
    """A frame the dialect cannot read, or one that breaks the stream's structure."""


class _Check:
    """One rule's checker on one channel, and its view of the text after the last replacement.

    The ``view`` (see ``_ChannelGuard._watch``) reads what the client sees after a replacement.
    It retires once the text it reads is far enough past the replacement to read the same as
    the original.
    """

    __slots__ = ("checker", "holds", "rule", "safe", "view")

    def __init__(self, rule: BoundRule, holds: bool, json_text: bool) -> None:
        self.rule = rule
        self.checker: Checker = _checker(rule, json_text)
        self.holds = holds
        self.safe = 0
        self.view: _View | None = None


class _View:
    """A second checker of one rule, reading the client's text around a replacement.

    ``shift`` maps its offsets onto the channel's; ``until`` is where it retires.
    """

    __slots__ = ("checker", "shift", "until")

    def __init__(self, checker: Checker, shift: int, until: int) -> None:
        self.checker = checker
        self.shift = shift
        self.until = until


class _ChannelGuard:
    """The rules, held text and release state of one channel."""

    __slots__ = (
        "checkers",
        "final",
        "finished",
        "held_since",
        "hidden",
        "hits",
        "json_text",
        "last_hit",
        "log",
        "name",
        "pending",
        "received",
        "redacted_until",
        "released",
        "restarted",
    )

    def __init__(self, name: str, rules: Sequence[BoundRule], json_text: bool = False) -> None:
        self.name = name
        self.json_text = json_text
        # Shadow-mode (log) rules never hold text back, so that they change neither what the
        # client sees nor when.
        self.checkers = tuple(
            _Check(rule, rule.holdback and rule.action is not Action.LOG, json_text)
            for rule in rules
            if rule.checks_text
        )
        self.final = False
        self.restarted = False
        self.last_hit: tuple[int, int, str] | None = None
        self.hits: list[tuple[Hit, BoundRule]] | None = None  # made at the first hit
        self.pending = ""  # text from offset `released` on, not yet sent
        self.received = 0
        self.released = 0
        self.redacted_until = -1
        self.held_since: float | None = None
        self.finished = False
        self.hidden = False  # final answer only: the channel is checked but never sent
        # What the rules passed: what reached the client, replacements included (a hidden
        # channel's: what it would have sent).
        self.log = TextLog()

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
            self.finished = self.final = True
        frontier = self.received
        for check in self.checkers:
            try:
                verdict: Verdict = check.checker.finish() if final else check.checker.feed(text)
                safe, hits = verdict
                if check.view is not None:
                    safe = min(safe, self._view_feed(check, text, final))
            except Exception as exc:
                raise RuleError(check.rule.name, f"{type(exc).__name__}: {exc}") from exc
            if hits:
                self._add_hits(hits, check.rule)
            check.safe = safe
            if check.holds and safe < frontier and not final:
                frontier = safe
        if frontier == self.received and not self.hits and self.held_since is None:
            # The common case: nothing held before, nothing to act on, all of it safe.
            released, self.pending, self.released = self.pending, "", frontier
            if released:
                self._record(released)
            return released
        start = self.released
        if self.hits:
            released = self._release(frontier, out)
        else:  # (nearly always: text held back only because it may begin a match)
            released = self._take(frontier) if frontier > start else ""
        plain = self.released - max(start, self.redacted_until)  # released text after the last replacement
        if released and self.pending and plain > 0 and not released[-1].isspace():
            # Text still held is glued to what is released: if it is later replaced, or the stream
            # ends before it, the client sees a new neighbour there, which can complete a match
            # (123-45-6789 before a redacted "-----BEGIN" is a bounded SSN). Hold the glued run too.
            glued = _GLUED.search(released)
            run = min(glued.end() - glued.start() if glued is not None else 0, plain)
            if run <= _EDGE_CONTEXT:
                self.pending = released[len(released) - run :] + self.pending
                self.released -= run
                released = released[: len(released) - run]
        if released:
            self._record(released)
            if held_before and self.held_since is not None:
                out.append(Released(min(held_before, len(released)), self.held_since))
                self.held_since = None
        if self.pending and self.held_since is None:
            self.held_since = now
        return released

    def _add_hits(self, hits: Sequence[Hit], rule: BoundRule) -> None:
        if not hits:
            return
        found = [(hit, rule) for hit in hits]
        if self.hits is None:
            self.hits = found
        else:
            self.hits.extend(found)

    def _record(self, released: str) -> None:
        self.log.append(released)

    def text_so_far(self) -> str:
        """What the channel released, sent or (hidden) withheld: what the rules passed."""
        return self.log.text()

    def _release(self, frontier: int, out: list[Output]) -> str:
        parts: list[str] = []
        while self.hits:
            self.hits.sort(key=lambda item: (item[0].start, _PRECEDENCE[item[1].action]))
            while self.hits and self.hits[0][0].start < frontier and not self.restarted:
                hit, rule = self.hits.pop(0)
                self._act(hit, rule, parts, out)
            if not self.restarted:
                break
            # A redaction restarted the pattern rules on what the client sees: ask them again.
            self.restarted = False
            frontier = self.received
            if not self.final:
                frontier = min((check.safe for check in self.checkers if check.holds), default=frontier)
        if frontier > self.released:
            parts.append(self._take(frontier))
        return "".join(parts)

    def _take(self, until: int) -> str:
        count = until - self.released
        text, self.pending = self.pending[:count], self.pending[count:]
        self.released = until
        return text

    def _act(self, hit: Hit, rule: BoundRule, parts: list[str], out: list[Output]) -> None:
        if (hit.start, hit.end, rule.name) == self.last_hit:
            return  # found again by the rule's view after a replacement
        self.last_hit = (hit.start, hit.end, rule.name)
        leaked = 0 if rule.holdback or rule.action is Action.LOG else max(0, min(hit.end, self.released) - hit.start)
        out.append(Intervention(rule.name, rule.action, self.name, hit.start, hit.end, leaked, hit.detail))
        if rule.action is Action.LOG:
            return
        if hit.start > self.released:
            parts.append(self._take(hit.start))
        if rule.action is not Action.REDACT:
            released = self._trim("".join(parts), "")
            self._record(released)
            raise _Trip(rule, released, self.name)
        if hit.end <= self.released:
            return
        # Overlapping redactions join into one replacement.
        if not (hit.start < self.released and self.redacted_until == self.released):
            parts[:] = [self._trim("".join(parts), rule.replacement), rule.replacement]
        stop = min(hit.end, self.received)
        self.pending = self.pending[stop - self.released :]
        self.released = self.redacted_until = stop
        self._watch(stop, self.text_so_far() + "".join(parts))

    def _watch(self, stop: int, client: str) -> None:
        """Have the pattern rules also read what the client sees after a replacement.

        A replacement changes the neighbours of the text after it: ``[redacted]`` before a key
        satisfies a lookbehind (or a word boundary) that the original neighbour failed. So each
        pattern rule gets a second checker, fed the client's text up to the replacement (only
        as context) and then the text after the redacted span. The first checker goes on with
        the original text: a match that started inside the redacted span (a private key after
        an API key) is still found there.
        """
        client = client[-_EDGE_CONTEXT:]
        shift = stop - len(client)
        for check in self.checkers:
            if not getattr(check.rule.rule, "scans_fields", False):
                continue
            check.view = view = _View(_checker(check.rule, self.json_text), shift, stop + _EDGE_CONTEXT)
            try:
                view.checker.feed(client)
                check.safe = min(check.safe, self._view_feed(check, self.pending, self.final))
            except Exception as exc:
                raise RuleError(check.rule.name, f"{type(exc).__name__}: {exc}") from exc
            self.restarted = True

    def _view_feed(self, check: _Check, text: str, final: bool) -> int:
        """Feed the view checker; its new hits join the channel's; returns its safe offset."""
        view = check.view
        assert view is not None
        shift = view.shift
        safe, hits = view.checker.feed(text)
        if final:
            safe, more = view.checker.finish()
            hits += more
        safe += shift
        floor = view.until - _EDGE_CONTEXT
        known = {(hit.start, hit.end) for hit, rule in self.hits or () if rule is check.rule}
        moved = (_shifted(hit, shift, floor) for hit in hits if hit.end + shift > floor)
        self._add_hits([hit for hit in moved if (hit.start, hit.end) not in known], check.rule)
        if safe >= view.until:
            check.view = None  # past the replacement's reach: the original reads the same from here
        return safe

    def _trim(self, text: str, after: str) -> str:
        """``text`` cut before any match that the cut itself completes.

        The client sees ``text`` followed by ``after`` (a replacement, or the end of the stream)
        instead of the original continuation, and that can complete a match the original did
        not hold: ``Project Starlight`` cut from ``Project Starlight비밀번호`` is a word-bounded
        phrase. Text held back is still unsent here, so such a match is dropped with the cut.
        """
        rules = [check.rule for check in self.checkers if check.rule.action is not Action.LOG]
        rules = [rule for rule in rules if getattr(rule.rule, "scans_fields", False)]
        if not text or not rules:
            return text
        context = self.text_so_far()[-_EDGE_CONTEXT:]
        while text:
            whole = context + text + after
            cut = len(text)
            for rule in rules:
                checker = _checker(rule, self.json_text)
                for hit in checker.feed(whole).hits + checker.finish().hits:
                    if hit.end > len(context) and hit.start < len(context) + len(text):
                        cut = min(cut, max(0, hit.start - len(context)))
            if cut == len(text):
                break
            # Drop the run glued to the cut first (what hold-back keeps back too), then the match.
            glued = _GLUED.search(text)
            text = text[: max(cut, glued.start() if glued is not None else len(text))]
        return text


@mypyc_attr(allow_interpreted_subclasses=True)
class StreamGuard:
    """Guards one response in one dialect.

    Feed it the response body as it arrives; send the ``Send`` outputs' bytes to the client
    in order; when an ``Ended`` output appears, close the body and stop the app.

    Args:
        rules: the rules that apply to this stream.
        dialect: the response's :class:`~guardrail.core.dialect.DialectStream` (its framing
            says how the body is cut). By default the default dialect's stream (see
            :func:`~guardrail.core.dialects.default_stream`), started with ``options``.
        start: when the request started, on the clock the shell passes as ``now``.
        encoding: the tiktoken encoding that counts completion tokens (see
            :meth:`completion_tokens`); None: no counting, no usage written by the guard.
        prompt_tokens: the request's prompt tokens, for usage the dialect writes.
        hide: kinds of channel (reasoning, tool calls) checked by the rules but never sent: the
            rule file's ``final_answer_only``.
        continuation: this guard guards a url fallback's answer, spliced into a stream the
            client already has: a rule with ``action: fallback`` acts as ``abort``.
        text_before: a continuation's channels' text the client already has (the first
            stream's): completion tokens count each channel as one text, from its start.
    """

    __slots__ = (
        "_channels",
        "_clean",
        "_clean_others",
        "_completion_tokens",
        "_continuation",
        "_encoding",
        "_ended",
        "_field_rules",
        "_frames",
        "_hide",
        "_natural_end",
        "_outgoing",
        "_prompt_tokens",
        "_queue",
        "_reported_unknown",
        "_text_before",
        "_text_rules",
        "_timed_rules",
        "_timers",
        "deltas",
        "first_text_at",
        "stream",
    )

    def __init__(
        self,
        rules: Sequence[BoundRule],
        dialect: DialectStream | None = None,
        *,
        start: float = 0.0,
        encoding: BPEEncoding | None = None,
        prompt_tokens: int | None = None,
        continuation: bool = False,
        # frozenset() rather than (): with a literal default here the compiled build fails to
        # build (mypyc cannot write this signature's text form, keyword-only with **options).
        hide: Collection[Kind] = frozenset(),
        text_before: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        plan = _plan_for(tuple(rules))
        self._text_before = dict(text_before) if text_before else None
        self._hide = hide if type(hide) is frozenset else frozenset(hide)  # (shared, not copied per stream)
        self._text_rules = plan.text_rules
        self._field_rules = plan.field_rules
        self._timed_rules = plan.timed_rules
        self._timers: tuple[Timer, ...] = tuple(cast(TimedRule, rule.rule).timer(start) for rule in plan.timed_rules)
        if dialect is None:
            options.setdefault("prompt_tokens", prompt_tokens)
            dialect = default_stream(continuation=continuation, **options)
        self.stream = dialect
        if self._hide and hasattr(dialect, "hidden"):
            dialect.hidden = self._hide  # so that it can leave out the events around withheld text too
        # Only dialects that must touch every outgoing byte (Responses renumbers its events) have one.
        self._outgoing = getattr(dialect, "outgoing", None)
        self._frames = frames_for(dialect.framing)
        self._continuation = continuation
        self._channels: dict[str, _ChannelGuard] = {}
        # Output that waits: bytes behind a closing that waits for held text (see _Wait).
        self._queue: list[bytes | _Wait] | None = None
        self._natural_end = False
        # Strings outside channels already checked and clean: the last event's (a dialect hands
        # back the same tuple while they repeat), and all of them once they differ.
        self._clean_others: Sequence[str] | None = None
        self._clean: dict[str, None] | None = None
        self._ended = False
        self._reported_unknown = False
        self._encoding = encoding
        self._prompt_tokens = prompt_tokens
        self._completion_tokens: int | None = None
        self.deltas = 0
        self.first_text_at: float | None = None

    # -- the ledger the dialect writes endings from -----------------------------------------

    @property
    def prompt_tokens(self) -> int | None:
        return self._prompt_tokens

    def sent(self, channel: str) -> str:
        guard = self._channels.get(channel)
        return guard.log.text() if guard is not None and not guard.hidden else ""

    def add(self, channel: str, text: str) -> None:
        guard = self._channels.get(channel)
        if guard is None:
            guard = self._channels[channel] = _ChannelGuard(channel, self._text_rules)
        guard.log.append(text)

    @property
    def ended(self) -> bool:
        """True once the guard has ended the stream (or seen it close)."""
        return self._ended

    @property
    def dialect(self) -> str:
        """The name of the stream's dialect (the ``dialect`` metric label)."""
        return str(getattr(self.stream, "dialect_name", "openai_chat"))

    @property
    def identity(self) -> dict[str, Any]:
        """The stream's identity (OpenAI chat: ``id``, ``object``, ``created``, ``model``), for a continuation."""
        return dict(getattr(self.stream, "identity", {}))

    def completion_tokens(self) -> int | None:
        """Tokens of the text the client received so far, every channel's counted on its own.

        The text is encoded once per call (at the end of a stream, not per delta); None
        without an encoding.
        """
        if self._encoding is None:
            return None
        if self._completion_tokens is None or not self._ended:
            encode = self._encoding.encode_ordinary
            # What the model produced and the rules passed: hidden channels (final answer only) too.
            texts = dict(self._text_before or {})
            for channel in self._channels.values():
                texts[channel.name] = texts.get(channel.name, "") + channel.text_so_far()
            self._completion_tokens = sum(len(encode(text)) for text in texts.values())
        return self._completion_tokens

    def sent_text(self) -> dict[str, str]:
        """The text the client received so far, by channel name."""
        return {
            name: text
            for name, text in ((c.name, c.log.text()) for c in self._channels.values() if not c.hidden)
            if text
        }

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
        for timer in self._timers:
            due = timer.deadline()
            if due is not None and (earliest is None or due < earliest):
                earliest = due
        return earliest

    # -- the shell's calls -------------------------------------------------------------------

    def expire(self, now: float) -> list[Output]:
        """Let time-based rules look at the clock; end the stream if one of their limits has passed."""
        if self._ended:
            return []
        out: list[Output] = []
        wire: list[bytes | _Wait] = []
        for rule, timer in zip(self._timed_rules, self._timers, strict=True):
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

        ``data`` may also be a ``bytearray`` or ``memoryview``; it is copied, so reusing the
        buffer afterwards is safe. An event passed through whole goes out as the very ``bytes``
        object that brought it.

        Never raises: malformed or oversized events, failing rules and failures inside the
        dialect end the stream with an in-dialect error and an ``Anomaly``.
        """
        if self._ended:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        out: list[Output] = []
        wire: list[bytes | _Wait] = []
        try:
            frames = self._frames.feed(data)
        except SSEError as exc:
            self._fail(AnomalyKind.OVERSIZED_EVENT, str(exc), "event_too_large", wire, out)
            return self._flush(wire, out)
        for raw, fields in frames:
            self._guarded(raw, fields, now, wire, out)
            if self._ended:
                break
        return self._flush(wire, out)

    def close(self, now: float = 0.0) -> list[Output]:
        """The body is complete: release what is still held (if it is safe) and finish."""
        if self._ended:
            return []
        out: list[Output] = []
        wire: list[bytes | _Wait] = []
        try:
            frames = self._frames.close()
        except SSEError:
            frames = []  # already reported when it was raised
        for raw, fields in frames:
            if fields is not None and getattr(fields, "data", 0) is None and not raw.strip():
                wire.append(raw)  # only ever the LF of a CRLF split across the last chunks
                continue
            self._guarded(raw, fields, now, wire, out)
            if self._ended:
                return self._flush(wire, out)
        if self._frames.discarded:
            detail = f"{self._frames.discarded} bytes after the last complete event were dropped"
            out.append(Anomaly(AnomalyKind.UNTERMINATED_EVENT, detail, ended_stream=False))
        if not self._release_held(now, wire, out):
            return self._flush(wire, out)
        if getattr(self.stream, "complete", True):
            self._end_stream(None, None, wire)
            out.append(Ended(Outcome.COMPLETED))
        else:
            # Cut short: without an error the client could take the text for the whole answer.
            detail = "the stream ended before its dialect's end (no finish, no end event)"
            out.append(Anomaly(AnomalyKind.TRUNCATED_STREAM, detail, ended_stream=True))
            message = "The upstream stream was cut short: it ended without a finish or an end event."
            self._end_stream(Fail("upstream_truncated", message, "upstream_error"), None, wire)
            out.append(Ended(Outcome.UPSTREAM_ERROR))
        return self._flush(wire, out)

    def upstream_failed(self, detail: str, now: float = 0.0) -> list[Output]:
        """The app or upstream failed mid-stream: release what is safe, then end with an in-dialect error."""
        if self._ended:
            return []
        out: list[Output] = []
        wire: list[bytes | _Wait] = []
        if self._release_held(now, wire, out):
            self._end_stream(
                Fail("upstream_error", f"the upstream stream failed: {detail}", "upstream_error"), None, wire
            )
            out.append(Ended(Outcome.UPSTREAM_ERROR))
        return self._flush(wire, out)

    def abort(self, now: float = 0.0) -> list[Output]:
        """End the stream now, as an ``abort`` rule would: release what is safe, then stop it in its dialect.

        Returns:
            The outputs, ending with ``Ended(Outcome.ABORTED)`` (or with what ended the stream
            if releasing the held text tripped a rule); nothing if the stream has already ended.
        """
        if self._ended:
            return []
        out: list[Output] = []
        wire: list[bytes | _Wait] = []
        if self._release_held(now, wire, out):
            self._end_stream(Stop(StopReason.POLICY), None, wire)
            out.append(Ended(Outcome.ABORTED))
        return self._flush(wire, out)

    # -- frames -----------------------------------------------------------------------------

    def _guarded(self, raw: bytes, fields: Any, now: float, wire: list[bytes | _Wait], out: list[Output]) -> None:
        """Handle one frame; whatever fails ends the stream in its dialect, never escapes."""
        mark = len(wire)
        try:
            self._handle(self.stream.parse(raw, fields), now, wire, out)
        except _Trip as trip:
            self._trip(trip, wire, out)
        except RuleError as exc:
            self._fail(AnomalyKind.RULE_ERROR, str(exc), "rule_error", wire, out, exc.rule)
        except _Unreadable as exc:
            del wire[mark:]
            self._fail(AnomalyKind.MALFORMED_EVENT, str(exc), "malformed_event", wire, out)
        except Exception as exc:  # a bug or a shape nobody foresaw: fail closed, never leak
            del wire[mark:]
            detail = f"{type(exc).__name__} while reading an event"
            self._fail(AnomalyKind.MALFORMED_EVENT, detail, "malformed_event", wire, out)

    def _handle(self, parsed: Parsed, now: float, wire: list[bytes | _Wait], out: list[Output]) -> None:
        if parsed.others:
            self._check_others(parsed.others, out)
        kind = parsed.kind
        if kind is EventKind.TEXT:
            self._handle_text(parsed, now, wire, out)
        elif kind is EventKind.PASS:
            if parsed.raw:
                wire.append(parsed.raw)
        elif kind is EventKind.END:
            self._flush_channels(now, wire, out)
            self._end_stream(None, parsed, wire)
            out.append(Ended(Outcome.COMPLETED))
        elif kind is EventKind.ERROR:
            self._flush_channels(now, wire, out)
            wire.append(parsed.raw)
        elif kind is EventKind.UNKNOWN:
            if not self._reported_unknown:
                self._reported_unknown = True
                detail = f"an event this dialect does not know ({parsed.detail}), passed through"
                out.append(Anomaly(AnomalyKind.UNKNOWN_EVENT, detail, False))
            wire.append(parsed.raw)
        else:
            raise _Unreadable(parsed.detail or "an event that cannot be read")

    def _handle_text(self, parsed: Parsed, now: float, wire: list[bytes | _Wait], out: list[Output]) -> None:
        texts: dict[int, str] = {}
        whole = True
        last: dict[str, int] = {}  # channel: its last piece in this event
        number = -1
        try:
            for number, piece in enumerate(parsed.pieces):
                channel = self._channel(piece.channel, piece.json_text, piece.kind)
                self.deltas += 1  # checked by every rule, even if it trips one
                released = channel.feed(piece.text, final=False, out=out, now=now)
                for timer in self._timers:
                    timer.content(now)
                if channel.hidden:
                    released = ""  # final answer only: checked, counted, not sent
                texts[number] = released
                last[piece.channel] = number
                whole = whole and released == piece.text
            late: list[bytes] = []
            for name in parsed.ends:
                ending = self._channels.get(name)
                if ending is None or ending.finished:
                    continue
                number = last.get(name, -1)
                released = ending.feed("", final=True, out=out, now=now)
                if not released or ending.hidden:
                    continue
                if number >= 0:
                    texts[number] += released
                    whole = False
                else:
                    late.append(self.stream.text(name, released))
        except _Trip as trip:
            hidden = self._channels[trip.channel].hidden if trip.channel in self._channels else False
            if hidden:
                pass  # final answer only: nothing of it goes out
            elif number >= 0:
                texts[number] = texts.get(number, "") + trip.released
            elif trip.released:
                wire.append(self.stream.text(trip.channel, trip.released))
            trip.released = ""
            rewritten = self.stream.rewrite(parsed, texts, self, closing=False)
            if rewritten:
                wire.append(rewritten)
            raise
        wire.extend(late)
        if parsed.waits and self._holding(parsed.waits):
            # The event closes channels that still hold text: its text goes now, its closing
            # part once that text has gone out (text may still continue those channels).
            rewritten = self.stream.rewrite(parsed, texts, self, closing=False)
            if rewritten:
                wire.append(rewritten)
            wire.append(_Wait(parsed.waits, parsed))
        elif whole and not parsed.derived:
            wire.append(parsed.raw)
        else:
            rewritten = self.stream.rewrite(parsed, texts, self)
            if rewritten:
                wire.append(rewritten)
        if self.first_text_at is None and any(texts.values()):
            self.first_text_at = now

    def _check_others(self, others: Sequence[str], out: list[Output]) -> None:
        """Check every string outside channels whole: a match there ends the stream.

        Such text cannot be held back and released in part (an ``id``, a comment, an error's
        message): a hit by any rule but a ``log`` one ends the stream before the frame goes out.
        """
        last = self._clean_others
        if others is last:
            return  # the very strings checked last time (a dialect hands back what repeats)
        clean = self._clean
        if clean is None and last is not None:
            if len(last) <= _FEW_STRINGS and all(text in last for text in others):
                self._clean_others = others  # some of the same strings again (a stream's id and model)
                return
            clean = self._clean = dict.fromkeys(last)
        for text in others:
            if clean is not None and text in clean:
                continue
            for rule, check in self._field_rules:
                try:
                    hits = check(text)
                except Exception as exc:
                    raise RuleError(rule.name, f"{type(exc).__name__}: {exc}") from exc
                if not hits:
                    continue
                hit = hits[0]
                out.append(Intervention(rule.name, rule.action, "event", hit.start, hit.end, 0, hit.detail))
                if rule.action is not Action.LOG:
                    raise _Trip(rule, "", "event")
            if clean is not None:
                if len(clean) >= _CLEAN_STRINGS:
                    clean.clear()
                clean[text] = None
        self._clean_others = others

    def _release_held(self, now: float, wire: list[bytes | _Wait], out: list[Output]) -> bool:
        """End every channel: what was held only because more text might complete a match is safe now.

        Returns False if that ended the stream instead (a pending match turned out final and
        tripped its rule, or a rule failed).
        """
        try:
            self._flush_channels(now, wire, out)
        except _Trip as trip:
            self._trip(trip, wire, out)
            return False
        except RuleError as exc:
            self._fail(AnomalyKind.RULE_ERROR, str(exc), "rule_error", wire, out, exc.rule)
            return False
        return True

    def _channel(self, name: str, json_text: bool = False, kind: Kind = Kind.ANSWER) -> _ChannelGuard:
        guard = self._channels.get(name)
        if guard is None:
            guard = self._channels[name] = _ChannelGuard(name, self._text_rules, json_text)
            guard.hidden = kind in self._hide
        elif guard.finished:
            raise _Unreadable(f"text on {name} after the event that ended it")
        return guard

    def _flush_channels(self, now: float, wire: list[bytes | _Wait], out: list[Output]) -> None:
        for channel in list(self._channels.values()):
            if channel.finished:
                continue
            try:
                released = channel.feed("", final=True, out=out, now=now)
            except _Trip as trip:
                if trip.released and not channel.hidden:
                    self._before_wait(channel.name, self.stream.text(channel.name, trip.released), wire)
                    trip.released = ""
                raise
            if released and not channel.hidden:
                self._before_wait(channel.name, self.stream.text(channel.name, released), wire)
                if self.first_text_at is None:
                    self.first_text_at = now

    # -- endings --------------------------------------------------------------------------

    def _end_stream(self, ending: Ending | None, parsed: Parsed | None, wire: list[bytes | _Wait]) -> None:
        """Write the stream's ending: its own (``ending`` None), or one the guard decided.

        Closings still waiting go out before a natural end; an ending the guard decides closes
        those channels its own way instead.
        """
        self._ended = True
        self._natural_end = ending is None
        wire.append(_written(self.stream.end, ending, self, parsed))

    def _trip(self, trip: _Trip, wire: list[bytes | _Wait], out: list[Output]) -> None:
        rule = trip.rule
        if self._fall_back(rule, Outcome.FALLBACK, wire, out):
            return
        self._end_stream(Stop(_stop_reason(rule)), None, wire)
        out.append(Ended(Outcome.ABORTED, rule.name))

    def _time_out(self, rule: BoundRule, code: str, wire: list[bytes | _Wait], out: list[Output]) -> None:
        if self._fall_back(rule, Outcome.TIMEOUT, wire, out):
            return
        message = f"guardrail ended the stream: {_TIMEOUT_MESSAGES.get(code, code)} (rule {rule.name!r})"
        self._end_stream(Fail(code, message, "timeout"), None, wire)
        out.append(Ended(Outcome.TIMEOUT, rule.name))

    def _fall_back(self, rule: BoundRule, outcome: Outcome, wire: list[bytes | _Wait], out: list[Output]) -> bool:
        """End with the rule's fallback if it has one: stream its text, or hand its url to the shell."""
        fallback = None if self._continuation else rule.fallback  # a second trip aborts
        if rule.action is not Action.FALLBACK or fallback is None:
            return False
        if fallback.url is not None:
            if self.stream.framing is not Framing.SSE or not hasattr(self.stream, "continuation"):
                return False  # another upstream's answer splices only into a chat-style stream: abort
            self._ended = True  # closings still waiting are dropped: the fallback's answer continues those channels
            out.append(Ended(outcome, rule.name, fallback))  # the shell streams the other upstream
            return True
        if fallback.text is None:
            return False
        answered = any(self.sent(name) for name, channel in self._channels.items() if not channel.hidden)
        text = fallback.separator + fallback.text if answered else fallback.text
        self._end_stream(FallbackText(text), None, wire)
        out.append(Ended(outcome, rule.name))
        return True

    def _fail(
        self,
        kind: AnomalyKind,
        detail: str,
        code: str,
        wire: list[bytes | _Wait],
        out: list[Output],
        rule: str | None = None,
    ) -> None:
        out.append(Anomaly(kind, detail, ended_stream=True, rule=rule))
        self._ended = True
        # A failing rule's message may quote the text it was checking: the client gets only its name.
        said = f"rule {rule!r} failed" if kind is AnomalyKind.RULE_ERROR and rule is not None else detail
        wire.append(_written(self.stream.end, Fail(code, f"guardrail ended the stream: {said}"), self, None))
        outcome = Outcome.UPSTREAM_ERROR if kind is not AnomalyKind.RULE_ERROR else Outcome.ABORTED
        out.append(Ended(outcome))

    def _holding(self, prefixes: tuple[str, ...]) -> bool:
        return any(guard.pending and name.startswith(prefixes) for name, guard in self._channels.items())

    def _before_wait(self, channel: str, data: bytes, wire: list[bytes | _Wait]) -> None:
        """Put text released late on ``channel`` before the first closing that waits for it."""
        for items in (wire,) if self._queue is None else (self._queue, wire):
            for position, item in enumerate(items):
                if type(item) is _Wait and channel.startswith(item.waits):
                    items.insert(position, data)
                    return
        wire.append(data)

    def _flush(self, wire: list[bytes | _Wait], out: list[Output]) -> list[Output]:
        """Hand ``wire`` to the client in order, up to the first closing that still waits for held text."""
        if self._queue:
            wire = [*self._queue, *wire]
            self._queue = None
        if self._ended:  # a natural end writes what waited; an ending the guard decided closes its own way
            wire = [
                item if type(item) is not _Wait else _written(self.stream.closing, item.parsed, self)
                for item in wire
                if type(item) is not _Wait or self._natural_end
            ]
        else:
            for position, item in enumerate(wire):
                if type(item) is _Wait:
                    if self._holding(item.waits):
                        self._queue = wire[position:]
                        wire = wire[:position]
                        break
                    wire[position] = _written(self.stream.closing, item.parsed, self)
        # One piece, nearly always an event passed through whole, goes out as the very bytes that came in.
        data = cast(bytes, wire[0]) if len(wire) == 1 else b"".join(cast(list[bytes], wire))
        if data and self._outgoing is not None:
            data = self._outgoing(data)
        if data:
            # Ended, if present, comes last: the bytes before it still go out.
            if out and isinstance(out[-1], Ended):
                out.insert(len(out) - 1, Send(data))
            else:
                out.append(Send(data))
        return out


class _Wait(NamedTuple):
    """A frame's closing part, waiting until the channels named by ``waits`` hold nothing back."""

    waits: tuple[str, ...]
    parsed: Parsed


class _Plan(NamedTuple):
    """What a stream derives from its rules alone: worked out once per rule list, not per stream."""

    text_rules: tuple[BoundRule, ...]
    field_rules: tuple[tuple[BoundRule, Callable[[str], tuple[Hit, ...]]], ...]  # with how each checks a whole string
    timed_rules: tuple[BoundRule, ...]


_PLANS: dict[tuple[BoundRule, ...], _Plan] = {}
_PLANS_KEPT = 64  # rule lists (paths, reloads) remembered; the cache is cleared when full


def _plan_for(rules: tuple[BoundRule, ...]) -> _Plan:
    try:
        plan = _PLANS.get(rules)
    except TypeError:  # a plugin rule that cannot be hashed: worked out for this stream alone
        return _plan(rules)
    if plan is None:
        if len(_PLANS) >= _PLANS_KEPT:
            _PLANS.clear()
        plan = _PLANS[rules] = _plan(rules)
    return plan


def _plan(rules: tuple[BoundRule, ...]) -> _Plan:
    text_rules = tuple(rule for rule in rules if rule.checks_text)
    return _Plan(
        text_rules,
        tuple(
            (rule, _whole_text_check(cast(Rule, rule.rule)))
            for rule in text_rules
            if getattr(rule.rule, "scans_fields", False)
        ),
        tuple(rule for rule in rules if rule.watches_time),
    )


# Strings outside channels (ids, model names, comments) repeat on every event: each is checked
# once per stream. The cache is cleared when full, so a stream of ever-new strings costs a check each.
_CLEAN_STRINGS = 1024
# While the strings outside channels are among the last event's, and those are this few, they are
# compared with them instead of kept in a set of their own.
_FEW_STRINGS = 16


def _whole_text_check(rule: Rule) -> Callable[[str], tuple[Hit, ...]]:
    """How ``rule`` checks one string read whole: its own ``check_whole`` if it has one, else a fresh checker."""
    own = getattr(rule, "check_whole", None)
    if own is not None:
        return cast(Callable[[str], tuple[Hit, ...]], own)

    def check(text: str) -> tuple[Hit, ...]:
        checker = rule.checker()
        return checker.feed(text).hits + checker.finish().hits

    return check


_TIMEOUT_MESSAGES = {
    "idle_timeout": "the model sent no text for too long",
    "first_token_timeout": "the model took too long to start answering",
    "total_timeout": "the answer took too long",
}


def _written(write: Callable[..., bytes], *args: Any) -> bytes:
    """What a dialect writes for an ending or a closing; nothing if it fails (the guard never raises)."""
    try:
        return write(*args)
    except Exception:
        return b""


def _checker(rule: BoundRule, json_text: bool) -> Checker:
    """A fresh checker of ``rule``; on JSON text (tool arguments), one that reads its strings unescaped."""
    checker = cast(Rule, rule.rule).checker()
    return JsonTextChecker(checker) if json_text and getattr(rule.rule, "scans_fields", False) else checker


def _shifted(hit: Hit, shift: int, floor: int) -> Hit:
    if not shift and hit.start >= floor:
        return hit
    return Hit(max(hit.start + shift, floor), hit.end + shift, hit.detail)


def _stop_reason(rule: BoundRule) -> StopReason:
    return StopReason.LENGTH if getattr(rule.rule, "stop_reason", None) == "length" else StopReason.POLICY
