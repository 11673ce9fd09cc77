"""Hold-back: how much text the guard holds, and for how long, on ordinary text and near partial matches.

``StreamGuard`` with ``rules/default.yaml`` is fed one OpenAI chunk per delta, ``now`` advancing at
model pace (30 deltas per second). After each delta, the content text of its ``Send`` bytes is
what the client got; characters are matched first in, first out with the characters that came in,
so every character has a hold time, in deltas and in milliseconds at model pace. The guard's own
``Released(chars, held_since)`` outputs are summed alongside as a cross-check.

Ordinary text is text that cannot start a banned match. The naive guard's full rescan serves as
the oracle: a character is ordinary if, after the delta that brought it, no pattern of the rule
file matches or partially matches from a position at or before it. The goal is that no ordinary
character is ever held. Text that could start a match (the article " a" could begin
``aws_secret_key``, a digit run a social security number, a hyphen a PEM header) is held until it
can no longer match: that is reported apart, with what was held.

    python bench/holdback.py [--deltas 2000]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from common import (
    CHAT_PATH,
    DEFAULT_RULES,
    MODEL_PACE,
    bench_rules,
    md_table,
    openai_stream,
    percentile,
    prose_deltas,
    raised_budgets,
    step,
    stream_text,
)
from naive import rule_file_patterns

from guardrail import Released, Send, StreamGuard, load_rules
from guardrail.core.rule import BoundRule


@dataclass(slots=True)
class HoldReport:
    """What the guard held in one stream."""

    name: str
    deltas: int
    chars: int
    held_chars: int = 0  # released later than the delta that brought them
    held_deltas: int = 0  # deltas with at least one character held
    ordinary_held: int = 0  # of the held characters, those that could not start a match
    hold_deltas: list[int] = field(default_factory=list)  # per held character
    hold_ms: list[float] = field(default_factory=list)  # per held character
    released_chars: int = 0  # the sum of the guard's Released outputs
    released_max_ms: float = 0.0
    cut_chars: int = 0  # never released: a rule ended the stream
    held_text: Counter[str] = field(default_factory=Counter)  # the deltas that were held, by text


def guard_stream(rules: Sequence[BoundRule], deltas: Sequence[str], name: str, *, oracle: bool = False) -> HoldReport:
    """Feed ``deltas`` through a StreamGuard at model pace; account for every character's hold."""
    patterns = rule_file_patterns(DEFAULT_RULES) if oracle else []
    chunks = openai_stream(deltas)
    guard = StreamGuard(rules, start=0.0)
    report = HoldReport(name, len(deltas), sum(map(len, deltas)))
    # [delta index, characters not yet released, ordinary characters among them, 1 once counted as held]
    queue: deque[list[int]] = deque()
    text = ""
    for index, chunk in enumerate(chunks):
        now = index / MODEL_PACE
        outputs = guard.feed(chunk, now) if index < len(chunks) - 1 else guard.feed(chunk, now) + guard.close(now)
        delta = index - 1  # chunks[0] is the role chunk
        if 0 <= delta < len(deltas) and deltas[delta]:
            piece = deltas[delta]
            ordinary = len(piece)
            if patterns:
                text += piece
                frontier = min(
                    (m.start() for p in patterns if (m := p.search(text, partial=True)) is not None), default=len(text)
                )
                ordinary = max(0, min(len(piece), frontier - (len(text) - len(piece))))
            queue.append([delta, len(piece), ordinary, 0])
        released = sum(len(stream_text(o.data)) for o in outputs if isinstance(o, Send))
        for output in outputs:
            if isinstance(output, Released):
                report.released_chars += output.chars
                report.released_max_ms = max(report.released_max_ms, (now - output.held_since) * 1e3)
        _release(report, queue, released, max(delta, 0), deltas)
        if guard.ended:
            break
    report.cut_chars = sum(item[1] for item in queue) + sum(map(len, deltas[max(delta, 0) + 1 :]))
    if report.cut_chars and not guard.ended:
        raise RuntimeError(f"{name}: {report.cut_chars} characters never reached the client")
    return report


def _release(report: HoldReport, queue: deque[list[int]], count: int, delta: int, deltas: Sequence[str]) -> None:
    while count > 0 and queue:
        item = queue[0]
        arrived, remaining, ordinary, counted = item
        taken = min(count, remaining)
        waited = delta - arrived
        if waited > 0:
            if not counted:
                item[3] = 1
                report.held_deltas += 1
                report.held_text[deltas[arrived]] += 1
            report.held_chars += taken
            # The ordinary characters of a delta come first: they end before any partial match starts.
            done = len(deltas[arrived]) - remaining
            report.ordinary_held += max(0, min(ordinary - done, taken))
            report.hold_deltas += [waited] * taken
            report.hold_ms += [waited / MODEL_PACE * 1e3] * taken
        item[1] -= taken
        count -= taken
        if item[1] == 0:
            queue.popleft()


# Text around partial matches: (name, deltas). Each sits in ordinary prose; none is a banned match.
PROSE_BEFORE = ("Here", " is", " the", " plan", " for", " the", " week", ":")
PROSE_AFTER = (" and", " then", " we", " ship", " it", ".")
SCENARIOS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('phrase start: " project", " plan"', (" the", " project", " plan", " is", " ready")),
    ('phrase almost whole: " project", " star", "ting"', (" the", " project", " star", "ting", " date")),
    ('"sk-" of a library name: " sk", "-", "learn", " is"', (" use", " sk", "-", "learn", " is", " fine")),
    ('digit run (phone number): " ", "555", "-", "010", "9"', (" call", " ", "555", "-", "010", "9", " today")),
    ('year as o200k splits it: " ", "202", "4"', (" in", " ", "202", "4", " we", " grew")),
    ('number that could start a card: " ", "409", "6", " tokens"', (" up", " to", " ", "409", "6", " tokens")),
    ('article " a" (could start aws_secret_key)', (" it", " is", " a", " test")),
    ('markdown bullet "-"', (":", "\n\n", "-", " First", " item")),
    ('markdown rule "---" (could start -----BEGIN)', (" end", ".\n\n", "---", "\n\n", "Next")),
)


@dataclass(frozen=True, slots=True)
class HoldbackResults:
    ordinary: HoldReport
    scenarios: list[HoldReport]


def _ms(values: Sequence[float], fraction: float | None = None) -> str:
    """The largest of ``values`` or their ``fraction`` quantile, in whole milliseconds."""
    if not values:
        return "0"
    return f"{max(values) if fraction is None else percentile(values, fraction):.0f}"


def table(results: HoldbackResults) -> str:
    o = results.ordinary
    summary = md_table(
        ("ordinary answer", "value"),
        [
            ("deltas / characters", f"{o.deltas:,} / {o.chars:,}"),
            ("ordinary characters held (cannot start a match)", f"{o.ordinary_held:,}"),
            ("characters held (could start a match)", f"{o.held_chars - o.ordinary_held:,}"),
            ("share of characters held", f"{o.held_chars / o.chars:.1%}"),
            ("deltas held (some or all of their text)", f"{o.held_deltas:,} ({o.held_deltas / o.deltas:.1%})"),
            ("hold of a held character: median / max, deltas", _deltas(o.hold_deltas)),
            ("hold of a held character: median / max, ms at 30 deltas/s", f"{_ms(o.hold_ms, 0.5)} / {_ms(o.hold_ms)}"),
            ("Released outputs: characters / longest hold ms", f"{o.released_chars:,} / {o.released_max_ms:.0f}"),
        ],
    )
    held = md_table(
        ("held delta text", "times"),
        [(repr(text).replace("|", "\\|"), count) for text, count in o.held_text.most_common(10)],
    )
    scenarios = md_table(
        ("near a partial match", "characters held", "longest hold, deltas", "longest hold ms at 30/s"),
        [
            (s.name.replace("|", "\\|"), s.held_chars, max(s.hold_deltas, default=0), _ms(s.hold_ms))
            for s in results.scenarios
        ],
    )
    return "\n\n".join((summary, "What was held in the ordinary answer (top 10):\n\n" + held, scenarios))


def _deltas(values: Sequence[int]) -> str:
    return f"{statistics.median(values):.0f} / {max(values)}" if values else "0 / 0"


def main(argv: Sequence[str] | None = None) -> HoldbackResults:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--deltas", type=int, default=2_000, help="deltas in the ordinary answer")
    args = parser.parse_args(argv)
    rules = load_rules(str(bench_rules())).rules_for(CHAT_PATH)
    step(f"hold-back: an ordinary answer of {args.deltas:,} deltas")
    ordinary = guard_stream(rules, prose_deltas(args.deltas), "ordinary answer", oracle=True)
    step(f"hold-back: {len(SCENARIOS)} partial-match cases")
    scenarios = [guard_stream(rules, PROSE_BEFORE + deltas + PROSE_AFTER, name) for name, deltas in SCENARIOS]
    for rule, budget in raised_budgets():
        step(f"hold-back: an answer running into the {budget:,}-token budget of default.yaml")
        as_is = load_rules(str(DEFAULT_RULES)).rules_for(CHAT_PATH)
        name = f"running into {rule} (max_tokens {budget:,}), default.yaml as is"
        scenarios.append(guard_stream(as_is, prose_deltas(budget * 2), name))
    results = HoldbackResults(ordinary, scenarios)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
