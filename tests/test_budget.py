"""The token_budget rule: a stream is cut at exactly ``max_tokens`` tokens, however it is chunked (issue 3).

Acceptance 2 (the rule and the engine under random chunkings; `TokenCounter` itself is covered by
``test_tokens.py``) and acceptance 3 (the official openai SDK over a real socket).

What "exactly" can mean. The guard cuts at a token boundary of the answer's own encoding, so the
client never sees a token split in a way the model's text would not be. Counts of prefixes are not
monotonic and can jump by more than one: a character that spans several tokens (``" 🎉"`` is
``b" \\xf0\\x9f\\x8e"`` then ``b"\\x89"`` in o200k_base) leaves no boundary with exactly N tokens
before it, and the longest fitting boundary then has N - 1 tokens (or fewer). The reference below
finds that boundary by brute force over every token of the whole answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import openai
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from openai.types.chat import ChatCompletionChunk
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware

from guardrail.asgi import GuardrailMiddleware
from guardrail.core.engine import StreamGuard
from guardrail.core.outputs import Ended, Intervention, Outcome, Send
from guardrail.core.rule import Action, BoundRule, Checker
from guardrail.metrics import GuardMetrics
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding
from tests.apps import ChatChunks, ClientEvent, generator_app, joined_content, split_events
from tests.servers import serve_in_thread

PROSE = [
    "The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ".",
    ",",
    "!",
    "?",
    ";",
    ":",
    " Hello",
    " world",
    " tokenizer",
    " antidisestablishmentarianism",
    " don't",
    " it's",
    " I'LL",
    "'s",
    "'",
    " (see above)",
    ' "quoted"',
    " e.g.",
    " https://example.com/a?b=c",
]
CODE = [
    "def total(xs):",
    "\n    return sum(x * 2 for x in xs)",
    "```python",
    "```",
    "{}",
    "=>",
    "// note",
    " x += 1;",
    "\t",
]
KOREAN = ["안녕하세요", " 세계", " 한국어", " 문장도 섞여 있습니다", "."]
EMOJI = ["🎉", " 🎉", "👩\u200d👩\u200d👧", "🇰🇷", " ✨", "e\u0301", "é"]
DIGITS = ["1", "42", " 1,234,567", " 3.14159", "2024-06-01", " 99%"]
WHITESPACE = [" ", "  ", "    ", "\n", "\n\n", " \n", "\n  ", "   \n\n   ", "\u00a0"]
SPECIAL = ["<|endoftext|>"]
FRAGMENTS = PROSE + CODE + KOREAN + EMOJI + DIGITS + WHITESPACE + SPECIAL


def o200k_count(text: str) -> int:
    return len(get_encoding("o200k_base").encode_ordinary(text))


def token_ends(text: str) -> list[int]:
    """Character offsets at which a token of ``text``'s o200k_base encoding ends (and 0), ascending.

    A token that ends inside a character (part of an emoji's bytes) ends no prefix.
    """
    encoding = get_encoding("o200k_base")
    ids = encoding.encode_ordinary(text)
    ends = [0]
    for count in range(1, len(ids) + 1):
        try:
            ends.append(len(encoding.decode_bytes(ids[:count]).decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return ends


def longest_fitting_prefix(text: str, budget: int) -> str:
    """The reference cut: the longest prefix ending on a token of ``text`` that has at most ``budget`` tokens."""
    return text[: max(end for end in token_ends(text) if o200k_count(text[:end]) <= budget)]


def has_prefix_of_exactly(text: str, budget: int) -> bool:
    """Whether some prefix ending on a token of ``text`` has exactly ``budget`` tokens."""
    return any(o200k_count(text[:end]) == budget for end in token_ends(text))


@dataclass(frozen=True, slots=True)
class ChunkedAnswer:
    deltas: list[str]
    budget: int

    @property
    def text(self) -> str:
        return "".join(self.deltas)


@st.composite
def chunked_answers(draw: st.DrawFn) -> ChunkedAnswer:
    """A realistic answer, chunked one character per delta or in random pieces, and a budget near its length."""
    text = draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=30).map("".join))
    if draw(st.booleans()):
        deltas = list(text)
    else:
        cuts = draw(st.lists(st.integers(1, len(text) - 1), max_size=len(text) // 2)) if len(text) > 1 else []
        points = sorted({0, len(text), *cuts})
        deltas = [text[start:end] for start, end in zip(points, points[1:], strict=False)]
    total = o200k_count(text)
    # Mostly budgets the answer crosses, where the cut lands; sometimes ones it fits.
    budget = draw(st.integers(0, max(total - 1, 0)) | st.integers(total, total + 2))
    return ChunkedAnswer(deltas, budget)


# -- the rule's checker ---------------------------------------------------------------------------


def budget_checker(budget: int) -> Checker:
    return TokenBudget(get_encoding("o200k_base"), max_tokens=budget).checker()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=chunked_answers())
def test_the_checker_never_objects_or_frees_text_past_the_budget_while_the_text_so_far_fits(
    answer: ChunkedAnswer,
) -> None:
    checker = budget_checker(answer.budget)
    seen = ""
    for delta in answer.deltas:
        seen += delta
        verdict = checker.feed(delta)
        if o200k_count(seen) > answer.budget:
            return  # past the budget: where the checker cuts is the next test's business
        assert verdict.hits == (), f"objected to {seen!r}, which has {o200k_count(seen)} tokens"
        assert o200k_count(seen[: verdict.safe]) <= answer.budget, f"freed {seen[: verdict.safe]!r}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=chunked_answers())
def test_the_checker_objects_only_to_answers_over_the_budget_from_the_longest_fitting_prefix(
    answer: ChunkedAnswer,
) -> None:
    checker = budget_checker(answer.budget)
    hits = [hit for delta in answer.deltas for hit in checker.feed(delta).hits]
    hits += checker.finish().hits
    if o200k_count(answer.text) <= answer.budget:
        assert hits == [], f"the answer has {o200k_count(answer.text)} tokens, within {answer.budget}"
    else:
        assert len(hits) == 1
        assert answer.text[: hits[0].start] == longest_fitting_prefix(answer.text, answer.budget)


# -- through the engine ---------------------------------------------------------------------------


@dataclass
class Client:
    """The client's side of a guarded stream, parsed as the bytes arrive."""

    buffer: bytes = b""
    events: list[ClientEvent] = field(default_factory=list)
    text: str = ""

    def receive(self, data: bytes) -> None:
        self.buffer += data
        complete = self.buffer.rfind(b"\n\n") + 2
        if complete < 2:
            return
        new = split_events(self.buffer[:complete])
        self.buffer = self.buffer[complete:]
        self.events += new
        self.text += joined_content(new)

    @property
    def finish_reasons(self) -> list[str]:
        return [
            choice["finish_reason"]
            for event in self.events
            if event.is_chunk
            for choice in event.json["choices"]
            if choice.get("finish_reason") is not None
        ]

    @property
    def usage(self) -> dict[str, int] | None:
        usages = [event.json["usage"] for event in self.events if event.is_chunk and event.json.get("usage")]
        assert len(usages) <= 1, usages
        return usages[0] if usages else None


@dataclass
class Guarded:
    client: Client
    text_after_each_feed: list[str]
    interventions: list[Intervention]
    ended: Ended


def guard_answer(deltas: Sequence[str], budget: int, *, action: Action = Action.ABORT) -> Guarded:
    """Feed ``deltas`` as OpenAI chunks, one per ``feed``, to a guard with only a token budget."""
    encoding = get_encoding("o200k_base")
    rule = BoundRule("budget", TokenBudget(encoding, max_tokens=budget), action)
    guard = StreamGuard([rule], encoding=encoding, include_usage=True, prompt_tokens=7)
    client = Client()
    after_each: list[str] = []
    interventions: list[Intervention] = []
    ended: list[Ended] = []
    for now, data in enumerate(ChatChunks().stream(deltas)):
        for output in guard.feed(data, float(now)):
            if isinstance(output, Send):
                client.receive(output.data)
            elif isinstance(output, Intervention):
                interventions.append(output)
            elif isinstance(output, Ended):
                ended.append(output)
        after_each.append(client.text)
    for output in guard.close(float(len(deltas) + 3)):
        if isinstance(output, Send):
            client.receive(output.data)
        elif isinstance(output, Ended):
            ended.append(output)
    assert client.buffer == b"", "the guard sent half an event"
    assert len(ended) == 1, ended
    return Guarded(client, after_each, interventions, ended[0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=chunked_answers())
def test_what_the_client_receives_never_exceeds_the_budget_at_any_delta(answer: ChunkedAnswer) -> None:
    guarded = guard_answer(answer.deltas, answer.budget)
    for received in guarded.text_after_each_feed:
        assert answer.text.startswith(received)
        assert o200k_count(received) <= answer.budget, f"{received!r} has more than {answer.budget} tokens"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=chunked_answers())
def test_the_client_receives_the_whole_answer_or_exactly_the_budget_and_length(answer: ChunkedAnswer) -> None:
    guarded = guard_answer(answer.deltas, answer.budget)
    received = guarded.client.text
    total = o200k_count(answer.text)
    if total <= answer.budget:
        assert (received, guarded.client.finish_reasons) == (answer.text, ["stop"]), (
            f"an answer of {total} tokens was cut at a budget of {answer.budget}"
        )
        assert guarded.interventions == []
        assert guarded.ended.outcome is Outcome.COMPLETED
        event("within the budget")
    else:
        assert guarded.client.finish_reasons == ["length"]
        assert guarded.ended == Ended(Outcome.ABORTED, "budget")
        if has_prefix_of_exactly(answer.text, answer.budget):
            assert o200k_count(received) == answer.budget, f"{received!r}"
        else:
            event("no prefix ends on a token with exactly the budget")
        # Inherent otherwise (a character spanning tokens at the cut): the longest boundary that fits.
        assert received == longest_fitting_prefix(answer.text, answer.budget)
    assert guarded.client.usage == {
        "prompt_tokens": 7,
        "completion_tokens": o200k_count(received),
        "total_tokens": 7 + o200k_count(received),
    }


def test_a_word_that_fits_the_budget_is_not_cut_where_a_prefix_of_it_had_one_token_more() -> None:
    # " quick" is one token, but " quic" is two (" qu", "ic"): the count passes the budget for one
    # delta and comes back. The cut must not land inside the word.
    guarded = guard_answer(list(" quick brown fox"), 1)
    assert (guarded.client.text, guarded.client.finish_reasons) == (" quick", ["length"])


def test_an_answer_within_the_budget_is_never_cut() -> None:
    assert o200k_count(" tokenizer") == 1 and o200k_count(" tokeni") == 2
    guarded = guard_answer(list("The tokenizer"), 2)
    assert (guarded.client.text, guarded.client.finish_reasons) == ("The tokenizer", ["stop"])
    assert guarded.ended.outcome is Outcome.COMPLETED


def test_a_character_spanning_two_tokens_at_the_cut_leaves_the_client_one_token_short() -> None:
    # "Hi 🎉 there" is "Hi", b" \xf0\x9f\x8e", b"\x89", " there": no boundary has exactly 2 tokens before it.
    text = "Hi 🎉 there"
    assert [o200k_count(text[:end]) for end in token_ends(text)] == [0, 1, 3, 4]
    for deltas in (list(text), ["Hi", " 🎉", " there"]):
        guarded = guard_answer(deltas, 2)
        assert (guarded.client.text, guarded.client.finish_reasons) == ("Hi", ["length"])


def test_a_budget_of_zero_sends_no_text_and_finishes_with_length() -> None:
    guarded = guard_answer(["Hello", " world"], 0)
    assert (guarded.client.text, guarded.client.finish_reasons) == ("", ["length"])
    assert guarded.client.usage == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}


def test_a_log_budget_reports_the_cut_and_changes_nothing() -> None:
    text = "The quick brown fox jumps over the lazy dog."
    guarded = guard_answer(list(text), 3, action=Action.LOG)
    assert (guarded.client.text, guarded.client.finish_reasons) == (text, ["stop"])
    assert [(i.rule, i.action, i.start) for i in guarded.interventions] == [
        ("budget", Action.LOG, len("The quick brown"))
    ]


# -- the openai SDK over a real socket (acceptance 3) ---------------------------------------------

ANSWER = (
    "Streaming an answer hides the model's latency: the first words appear while the rest is still "
    "being generated, and a reader can start before the model has finished. Guarding such a stream is "
    "harder than guarding a whole answer. The full text is never in hand, so every check must work on "
    "a growing prefix, and whatever has been sent cannot be taken back.\n\n"
    "A token budget is the simplest guard of all. Count the tokens of the text as it arrives, with the "
    "same tokenizer the model uses, and stop the stream once the count reaches the limit. The count has "
    "to be exact: a budget of 150 tokens should give the client 150 tokens, not 149 and not 151. That "
    "is harder than it sounds, because the last word of a prefix can still merge with what comes next "
    "(think of 'token' followed by 'izer'), so the guard must hold back the unsettled tail near the limit "
    "and release only text whose tokens can no longer change.\n\n"
    "Here is a small example in Python:\n\n"
    "```python\n"
    "def total(prices: list[float], tax: float = 0.2) -> float:\n"
    "    return round(sum(prices) * (1 + tax), 2)\n"
    "```\n\n"
    "It handles 1,234,567 items without trouble; the rounding keeps two decimals. The same rule applies "
    "to answers in other languages, such as Korean (한국어 문장도 섞여 있습니다), and to emoji 🎉, which "
    "can take more than one token each. When the budget runs out, the stream ends the way a model that "
    "ran out of tokens ends it: with finish_reason set to length, so every client knows what happened "
    "and can ask for a continuation if it wants one. Nothing else about the stream changes: the ids, the "
    "model name and the order of the events stay as the model sent them, and a client that asked for usage "
    "still gets a usage chunk whose completion tokens count exactly the text it received."
)

RULE_FILE = """\
version: 1
tokenizer: o200k_base
paths: ["/v1/*"]
rules:
  - name: budget
    type: token_budget
    max_tokens: {max_tokens}
    action: abort
"""


def token_deltas(text: str) -> list[str]:
    """``text`` in deltas of one o200k_base token each (tokens that end inside a character join the next)."""
    encoding = get_encoding("o200k_base")
    deltas: list[str] = []
    pending = b""
    for token in encoding.decode_tokens_bytes(encoding.encode_ordinary(text)):
        pending += token
        try:
            deltas.append(pending.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        pending = b""
    assert "".join(deltas) == text
    return deltas


def streaming_answer(deltas: Sequence[str]) -> AsyncIterator[bytes]:
    async def generate() -> AsyncIterator[bytes]:
        for chunk in ChatChunks().stream(deltas):
            await anyio.sleep(0)  # a real upstream awaits the network here
            yield chunk

    return generate()


def stream_with_sdk(base_url: str) -> list[ChatCompletionChunk]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="test", max_retries=0, timeout=10) as client:
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Explain."}]
        with client.chat.completions.create(model="gpt-test", messages=messages, stream=True) as stream:
            return list(stream)


@pytest.mark.parametrize("max_tokens", [1, 37, 150])
def test_the_openai_sdk_receives_exactly_max_tokens_of_the_answer_and_length(tmp_path: Path, max_tokens: int) -> None:
    rule_file = tmp_path / "budget.yaml"
    rule_file.write_text(RULE_FILE.format(max_tokens=max_tokens), encoding="utf-8")
    deltas = token_deltas(ANSWER)
    assert len(deltas) > 380, "about 400 deltas of one token each"
    guard = Middleware(GuardrailMiddleware, rules=str(rule_file), metrics=GuardMetrics(CollectorRegistry()))
    app = generator_app(lambda: streaming_answer(deltas), middleware=[guard])
    with serve_in_thread(app) as base_url:
        chunks = stream_with_sdk(base_url)
    received = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert ANSWER.startswith(received)
    assert o200k_count(received) == max_tokens
    assert reasons == ["length"]
    assert {chunk.id for chunk in chunks} == {"chatcmpl-test"}


def test_the_rule_file_tokenizer_counts_the_budget(tmp_path: Path) -> None:
    # gpt-4 maps to cl100k_base, which needs about half as many tokens again as o200k_base for Korean.
    answer = "스트리밍은 지연 시간을 숨깁니다. 한국어 문장도 섞여 있습니다. " * 8
    rule_file = tmp_path / "budget.yaml"
    rule_file.write_text(RULE_FILE.format(max_tokens=37).replace("o200k_base", "gpt-4"), encoding="utf-8")
    guard = Middleware(GuardrailMiddleware, rules=str(rule_file), metrics=GuardMetrics(CollectorRegistry()))
    app = generator_app(lambda: streaming_answer(token_deltas(answer)), middleware=[guard])
    with serve_in_thread(app) as base_url:
        chunks = stream_with_sdk(base_url)
    received = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert answer.startswith(received)
    assert len(get_encoding("cl100k_base").encode_ordinary(received)) == 37
    assert o200k_count(received) < 30
