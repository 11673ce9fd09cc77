"""A worked example of a guardrail plugin rule: stop a model stuck in a loop.

A model that degenerates often repeats the same line over and over. This rule fires on the
``max_repeats``-th consecutive copy of a line. Lines shorter than ``min_line_chars`` (blank
lines, "---", a lone "}") are ignored: they neither count nor break a run.

Use it from a rule file (see README.md next to this file)::

    - name: looping
      type: "repetition:RepetitionRule"
      options: {max_repeats: 3, min_line_chars: 8}
      action: abort

A plugin is any class whose instances have a ``checker()`` method returning a fresh
per-channel object with ``feed(text) -> Verdict`` and ``finish() -> Verdict``
(see ``guardrail/core/rule.py``). The class is built once, with the rule's ``options`` as
keyword arguments; raise ``TypeError`` or ``ValueError`` for bad options and ``guardrail check``
shows your message at the rule's ``options``.
"""

from __future__ import annotations

from guardrail.core.rule import Hit, Verdict

# Lines longer than this are not compared (a run of them never counts as repetition): the
# checker keeps one line of text per channel, and this bounds it.
MAX_LINE_CHARS = 4096


class RepetitionRule:
    """Fires when the same line appears ``max_repeats`` times in a row.

    Args:
        max_repeats: the copy of a line that fires the rule (2 fires on the first repeat).
        min_line_chars: lines shorter than this are ignored.

    Raises:
        TypeError: an option is not an integer.
        ValueError: ``max_repeats`` < 2 or ``min_line_chars`` < 1.
    """

    def __init__(self, *, max_repeats: int = 3, min_line_chars: int = 8) -> None:
        for option, value in (("max_repeats", max_repeats), ("min_line_chars", min_line_chars)):
            if type(value) is not int:
                raise TypeError(f"{option} must be an integer, not {value!r}")
        if max_repeats < 2:
            raise ValueError(f"max_repeats must be at least 2, not {max_repeats}")
        if min_line_chars < 1:
            raise ValueError(f"min_line_chars must be at least 1, not {min_line_chars}")
        self.max_repeats = max_repeats
        self.min_line_chars = min_line_chars

    def checker(self) -> RepetitionChecker:
        """A fresh checker for one channel of one stream."""
        return RepetitionChecker(self.max_repeats, self.min_line_chars)


class RepetitionChecker:
    """Per-channel state: the line being written, the last counted line and its run length.

    Every character is looked at once, so the cost of a delta depends on its length only.
    Text is released at once, except in one case: when the line being written could become
    the copy that fires the rule (its previous copies number ``max_repeats - 1`` or more and it is, so
    far, a prefix of them), it is held until its newline decides. With ``holdback: true`` the
    looping line therefore never reaches the client; with ``holdback: false`` nothing is held.
    """

    def __init__(self, max_repeats: int, min_line_chars: int) -> None:
        self._max_repeats = max_repeats
        self._min_line_chars = min_line_chars
        self._fed = 0  # characters fed so far
        self._line_start = 0  # offset of the line being written
        self._line: list[str] = []  # its text so far (up to MAX_LINE_CHARS)
        self._line_length = 0
        self._previous: str | None = None  # the last line that counted
        self._run = 0  # how many times in a row it appeared
        self._is_prefix = True  # the line being written is still a prefix of _previous

    def feed(self, text: str) -> Verdict:
        """Take the channel's next piece of text."""
        hits: list[Hit] = []
        position = 0
        while position < len(text):
            newline = text.find("\n", position)
            end = len(text) if newline < 0 else newline
            self._extend(text[position:end])
            self._fed += end - position
            if newline < 0:
                break
            hit = self._end_line()
            if hit is not None:
                hits.append(hit)
            self._fed += 1
            self._line_start = self._fed
            position = newline + 1
        return Verdict(self._safe(), tuple(hits))

    def finish(self) -> Verdict:
        """The text is complete: its last line counts even without a newline."""
        hit = self._end_line()
        self._line_start = self._fed
        return Verdict(self._fed, (hit,) if hit is not None else ())

    def _extend(self, piece: str) -> None:
        if self._is_prefix and self._previous is not None:
            start = self._line_length
            self._is_prefix = self._previous[start : start + len(piece)] == piece
        if self._line_length + len(piece) <= MAX_LINE_CHARS:
            self._line.append(piece)
        self._line_length += len(piece)

    def _end_line(self) -> Hit | None:
        line = "".join(self._line)
        length = self._line_length
        self._line, self._line_length, self._is_prefix = [], 0, True
        if len(line.strip()) < self._min_line_chars:
            return None  # too short to count, and it does not break a run
        if length > MAX_LINE_CHARS:
            self._previous, self._run = None, 0
            return None
        if line == self._previous:
            self._run += 1
        else:
            self._previous, self._run = line, 1
        if self._run < self._max_repeats:
            return None
        return Hit(self._line_start, self._line_start + length, f"line repeated {self._run} times")

    def _safe(self) -> int:
        could_fire = self._previous is not None and self._run >= self._max_repeats - 1 and self._is_prefix
        return self._line_start if could_fire else self._fed
