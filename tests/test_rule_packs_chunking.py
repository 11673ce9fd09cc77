"""The shipped rule packs, any text, any chunking: the client sees what the whole answer in one delta gives.

The reference is the same rules fed the whole answer in one delta with the banned-pattern
prefilter switched off (every pattern searched on every piece of text). The answers mix the
packs' secrets, PII and code names with text from the whole of Unicode, including characters
that case-fold into ASCII (the long s, the Kelvin sign, dotted and dotless i) and scripts above
the probed range; chunkings go down to one character per delta.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from guardrail.config import load_rules
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Anomaly, Ended, Intervention, Output, Send
from guardrail.core.rule import BoundRule, Checker
from guardrail.rules.banned import BannedPatterns, BannedPatternsChecker, _Both
from tests.apps import ChatChunks

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = ChatChunks(ensure_ascii=False, compact=True)


def banned_rules(pack: str) -> list[BoundRule]:
    return [rule for rule in load_rules(ROOT / "rules" / pack).rules if isinstance(rule.rule, BannedPatterns)]


class Unfiltered:
    """A banned_patterns rule with its prefilter off: every piece of text is searched."""

    scans_fields = True

    def __init__(self, rule: BannedPatterns) -> None:
        self.rule = rule

    def checker(self) -> Checker:
        searched = BannedPatternsChecker(replace(self.rule._plan, prefilter=None))
        return searched if self.rule._index is None else _Both(searched, self.rule._index.checker())


def unfiltered(rules: Sequence[BoundRule]) -> list[BoundRule]:
    return [
        dataclasses.replace(rule, rule=Unfiltered(rule.rule)) for rule in rules if isinstance(rule.rule, BannedPatterns)
    ]


PACKS = {pack: (banned_rules(pack), unfiltered(banned_rules(pack))) for pack in ("default.yaml", "secrets.yaml")}

FRAGMENTS = [
    "sk-proj-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8",
    "sk-" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp",
    "sk-ant-" + "api03-Abc_Def-Ghi1234567890",
    "AKIA" + "IOSFODNN7EXAMPLE",
    "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "xoxb-" + "1234567890-abcdefghij",
    "AIza" + "SyA1234567890abcdefghijklmnopqrstuv",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abcDEF123",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----",
    "123-45-6789",
    "4111 1111 1111 1111",
    "5500-0000-0000-0004",
    "Project Starlight",
    "PROJECT\n\tNIGHTJAR",
    "project starlights",
    "sk-",
    "sk-ant-",
    "AKIA",
    " a",
    " A",
    "-",
    "----",
    "2024-01-15",
    "555-123-4567",
]
# Characters that fold into ASCII under case-insensitive matching, and others around the probed range.
TRICKY = "\u017f\u212a\u0130\u0131\u00df\u1e9e\u00e9\u0250\u03a9\ufb01\uff53\uff4b\u200b\u2028\u00a0\u3000\ud55c\uae00"
alphabet = st.characters(exclude_categories=["Cs"]) | st.sampled_from(TRICKY + "sSkKaA-_ 0123456789\n")
pieces = st.sampled_from(FRAGMENTS) | st.text(alphabet, min_size=1, max_size=8)
answers = st.lists(pieces, min_size=1, max_size=10).map("".join)


def client_view(wire: bytes) -> tuple[str, list[str], bool]:
    """What an SDK makes of the bytes: the content of choice 0, the finish reasons, whether [DONE] came."""
    text, reasons, done = "", [], False
    for block in wire.split(b"\n\n"):
        data = "\n".join(line[6:] for line in block.decode().split("\n") if line.startswith("data: "))
        if not data:
            continue
        if data == "[DONE]":
            done = True
            continue
        obj: dict[str, Any] = json.loads(data)
        assert "error" not in obj, obj
        for choice in obj["choices"]:
            text += (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason"):
                reasons.append(choice["finish_reason"])
    return text, reasons, done


def run(rules: Sequence[BoundRule], deltas: Sequence[str]) -> tuple[tuple[str, list[str], bool], list[Output]]:
    guard = StreamGuard(rules)
    outputs: list[Output] = []
    for now, body in enumerate(CHUNKS.stream(deltas)):
        outputs += guard.feed(body, float(now))
    outputs += guard.close(float(len(deltas) + 3))
    wire = b"".join(output.data for output in outputs if isinstance(output, Send))
    return client_view(wire), [output for output in outputs if isinstance(output, Ended)]


def split(text: str, cuts: Sequence[int]) -> list[str]:
    points = sorted({cut % (len(text) + 1) for cut in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pack=st.sampled_from(sorted(PACKS)),
    answer=answers,
    cuts=st.one_of(st.lists(st.integers(0, 600), max_size=30), st.just(list(range(600)))),
)
def test_any_chunking_of_any_answer_gives_the_client_what_one_unfiltered_delta_gives(
    pack: str, answer: str, cuts: list[int]
) -> None:
    rules, reference_rules = PACKS[pack]
    expected, expected_end = run(reference_rules, [answer])
    seen, end = run(rules, split(answer, cuts))
    assert seen == expected
    assert end == expected_end


def test_no_character_of_a_pack_secret_reaches_the_client_one_character_per_delta() -> None:
    rules, _ = PACKS["secrets.yaml"]
    for secret in FRAGMENTS[:10]:
        answer = f"Here it is: {secret} \u2014 keep it safe."
        (text, reasons, done), _ = run(rules, list(answer))
        assert text == "Here it is: [redacted] \u2014 keep it safe.", secret
        assert (reasons, done) == (["stop"], True)


DEFAULT_RULES = load_rules(ROOT / "rules" / "default.yaml").rules  # the whole pack: budget and timeouts too
KEEP_ALIVE = b": keep-alive\n\n"
ordinary = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ.,;:!?'\"()0123456789-_\n\u00e9\ud55c\u2014"))


def body_events(deltas: Sequence[str], keep_alive_after: Sequence[bool]) -> list[bytes]:
    events = [CHUNKS.role()]
    for number, delta in enumerate(deltas):
        events.append(CHUNKS.content(delta))
        if number < len(keep_alive_after) and keep_alive_after[number]:
            events.append(KEEP_ALIVE)
    return [*events, CHUNKS.finish("stop"), CHUNKS.usage(), b"data: [DONE]\n\n"]


def content_of(body: bytes) -> str:
    return client_view(body.replace(KEEP_ALIVE, b""))[0]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    answer=ordinary,
    cuts=st.lists(st.integers(0, 300), max_size=30),
    keep_alives=st.lists(st.booleans(), max_size=30),
)
def test_when_no_rule_fires_events_never_held_go_out_as_the_apps_bytes(
    answer: str, cuts: list[int], keep_alives: list[bool]
) -> None:
    deltas = split(answer, cuts)
    events = body_events(deltas, keep_alives)
    guard = StreamGuard(DEFAULT_RULES)
    sent: list[bytes] = []
    fired = False
    nothing_held = True
    for now, event in enumerate(events):
        outputs = guard.feed(event, float(now))
        fired = fired or any(isinstance(output, Intervention | Anomaly) for output in outputs)
        out = b"".join(output.data for output in outputs if isinstance(output, Send))
        so_far = b"".join(events[: now + 1])
        if content_of(b"".join(sent) + out) != content_of(so_far):
            nothing_held = False  # this event's text (or part of it) is held for now
        elif nothing_held:
            assert out == event, f"event {now} was released whole but re-rendered"
        sent.append(out)
    closing = guard.close(float(len(events)))
    fired = fired or any(isinstance(output, Intervention | Anomaly) for output in closing)
    sent += [output.data for output in closing if isinstance(output, Send)]
    wire = b"".join(sent)
    if fired:
        return  # an answer that happens to contain a PII shape: not this test's case
    assert content_of(wire) == answer
    events_out = [block for block in wire.split(b"\n\n") if block]
    events_in = [block for block in b"".join(events).split(b"\n\n") if block]

    def non_text(blocks: list[bytes]) -> list[bytes]:
        return [block for block in blocks if b'"content":' not in block or b'"content":""' in block]

    assert non_text(events_out) == non_text(events_in)
    if nothing_held:
        assert wire == b"".join(events)
