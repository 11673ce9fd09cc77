"""The worked example plugin, examples/plugins/repetition.py, loaded from a rule file by import path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from guardrail.config import check_files, load_rules
from guardrail.core.rule import Action, Checker, Hit, Rule, Verdict

EXAMPLES = Path(__file__).parent.parent / "examples" / "plugins"


@pytest.fixture(autouse=True)
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)


def rule_file(options: str, *, extra: str = "") -> str:
    Path("r.yaml").write_text(
        textwrap.dedent(
            f"""\
            version: 1
            rules:
              - name: looping
                type: "repetition:RepetitionRule"
                options: {options}
                action: abort
            {extra}"""
        )
    )
    return "r.yaml"


def load(options: str = "{max_repeats: 3, min_line_chars: 4}") -> Rule:
    (bound,) = load_rules(rule_file(options)).rules
    assert (bound.name, bound.action, bound.holdback) == ("looping", Action.ABORT, True)
    assert isinstance(bound.rule, Rule)
    return bound.rule


def run(checker: Checker, pieces: list[str]) -> tuple[list[Verdict], Verdict]:
    return [checker.feed(piece) for piece in pieces], checker.finish()


LOOP = "I am thinking about it.\n"


def test_loaded_by_import_path_with_its_options() -> None:
    rule = load()

    assert type(rule).__name__ == "RepetitionRule"
    assert isinstance(rule.checker(), Checker)


@pytest.mark.parametrize("size", [None, 1, 3, 10])
def test_fires_on_the_third_copy_of_a_line(size: int | None) -> None:
    text = "Let me see.\n" + LOOP * 4
    pieces = [text] if size is None else [text[i : i + size] for i in range(0, len(text), size)]

    verdicts, final = run(load().checker(), pieces)

    hits = [hit for verdict in [*verdicts, final] for hit in verdict.hits]
    third = len("Let me see.\n") + 2 * len(LOOP)
    fourth = third + len(LOOP)
    assert hits == [
        Hit(third, third + len(LOOP) - 1, "line repeated 3 times"),
        Hit(fourth, fourth + len(LOOP) - 1, "line repeated 4 times"),
    ]
    assert final.safe == len(text)


def test_only_the_line_that_could_fire_is_held() -> None:
    checker = load().checker()

    assert checker.feed("Hello there.\n").safe == 13
    assert checker.feed(LOOP + LOOP).safe == 13 + 2 * len(LOOP)  # the second copy cannot fire yet
    held_from = 13 + 2 * len(LOOP)
    assert checker.feed("I am thin").safe == held_from  # could be the third copy: held
    assert checker.feed("king hard").safe == held_from + 18  # no longer a copy: released
    assert checker.feed("er.\n").hits == ()


def test_a_third_copy_is_reported_after_the_safe_offset() -> None:
    checker = load().checker()
    checker.feed(LOOP * 2)

    partial = checker.feed(LOOP[:-1])
    verdict = checker.feed("\n")

    assert partial.safe == 2 * len(LOOP)
    assert verdict.hits == (Hit(2 * len(LOOP), 3 * len(LOOP) - 1, "line repeated 3 times"),)
    assert verdict.hits[0].start >= partial.safe


def test_short_and_blank_lines_neither_count_nor_break_a_run() -> None:
    text = LOOP + "\n---\n" + LOOP + "}\n" + LOOP

    verdicts, final = run(load().checker(), [text])

    assert [hit.detail for verdict in [*verdicts, final] for hit in verdict.hits] == ["line repeated 3 times"]


def test_the_last_line_counts_without_a_newline() -> None:
    verdicts, final = run(load().checker(), [LOOP * 2 + LOOP.rstrip("\n")])

    assert [hit.detail for hit in final.hits] == ["line repeated 3 times"]
    assert final.safe == 3 * len(LOOP) - 1


def test_different_lines_never_fire() -> None:
    text = "".join(f"Step {i}: keep going.\n" for i in range(200))

    verdicts, final = run(load().checker(), [text])

    assert all(verdict.hits == () for verdict in [*verdicts, final])
    assert verdicts[-1].safe == len(text)


def test_very_long_lines_are_not_compared() -> None:
    long_line = "x" * 5000 + "\n"

    verdicts, final = run(load().checker(), [long_line] * 4)

    assert all(verdict.hits == () for verdict in [*verdicts, final])


def test_constructor_errors_are_located_at_options() -> None:
    path = rule_file("{max_repeat: 3}", extra='  - {name: ok, type: "repetition:RepetitionRule", action: log}\n')

    assert [str(problem) for problem in check_files([path])] == [
        "r.yaml:5: rules[0].options: plugin 'repetition:RepetitionRule' rejected its options: TypeError: "
        "RepetitionRule.__init__() got an unexpected keyword argument 'max_repeat'"
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{max_repeats: '3'}", "TypeError: max_repeats must be an integer, not '3'"),
        ("{max_repeats: 1}", "ValueError: max_repeats must be at least 2, not 1"),
        ("{min_line_chars: 0}", "ValueError: min_line_chars must be at least 1, not 0"),
    ],
)
def test_bad_option_values_are_located_at_options(options: str, message: str) -> None:
    assert [str(problem) for problem in check_files([rule_file(options)])] == [
        f"r.yaml:5: rules[0].options: plugin 'repetition:RepetitionRule' rejected its options: {message}"
    ]
