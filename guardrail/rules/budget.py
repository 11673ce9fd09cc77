"""The ``token_budget`` rule: an exact cap on completion tokens, enforced mid-stream, and on the prompt.

Tokens are counted with the rule file's tiktoken encoding, incrementally (see
:class:`~guardrail.core.tokens.TokenCounter`): after every delta the count equals
``len(encoding.encode_ordinary(text_so_far))``. When the count passes ``max_tokens``, the rule
objects to everything after the first ``max_tokens`` tokens, so an abort releases exactly that
many and ends with ``finish_reason: "length"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mypy_extensions import mypyc_attr

from guardrail.core.dialects._openai import chat_prompt_tokens
from guardrail.core.rule import Hit, Verdict
from guardrail.core.textlog import TextLog
from guardrail.core.tokens import BPEEncoding, TokenCounter

# Until the count comes this close to the budget, text is released as it arrives. Nearer the
# budget only settled text is released (the last word or two may still merge with what comes
# next, moving the token boundary), so the cut lands exactly on max_tokens.
NEAR_BUDGET_TOKENS = 16

# A run of text the tokenizer cannot settle (thousands of newlines, one letter repeated) makes
# every delta re-encode the whole run. Past this many unsettled characters the rule gives up on
# the stream (a model emitting that is broken), failing closed rather than stalling the loop.
MAX_UNSETTLED_CHARS = 16384


def count_prompt_tokens(payload: Mapping[str, Any], encoding: BPEEncoding) -> int:
    """Tokens of an OpenAI chat request's messages (see :func:`~guardrail.core.dialects._openai.chat_prompt_tokens`)."""
    encode = encoding.encode_ordinary
    return chat_prompt_tokens(payload, lambda text: len(encode(text)))


@mypyc_attr(allow_interpreted_subclasses=True)
class TokenBudget:
    """At most ``max_tokens`` completion tokens per channel, and ``max_prompt_tokens`` per request.

    Args:
        encoding: the tiktoken encoding to count with.
        max_tokens: the completion budget of each channel (a choice's content, refusal or
            tool-call arguments); None for no completion budget.
        max_prompt_tokens: the prompt budget (see :func:`count_prompt_tokens`); None for none.

    Raises:
        ValueError: neither budget is given, or one is negative.
    """

    # An abort by this rule ends the stream the way a model that ran out of tokens does.
    stop_reason = "length"

    def __init__(self, encoding: BPEEncoding, *, max_tokens: int | None = None, max_prompt_tokens: int | None = None):
        if max_tokens is None and max_prompt_tokens is None:
            raise ValueError("token_budget needs max_tokens, max_prompt_tokens or both")
        for name, value in (("max_tokens", max_tokens), ("max_prompt_tokens", max_prompt_tokens)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be zero or more, not {value}")
        self.encoding = encoding
        self.max_tokens = max_tokens
        self.max_prompt_tokens = max_prompt_tokens

    def checker(self) -> BudgetChecker | _NoBudget:
        """A fresh counter for one channel of one stream."""
        if self.max_tokens is None:
            return _NoBudget()
        return BudgetChecker(self.encoding, self.max_tokens)

    def prompt_over_budget(self, prompt_tokens: int) -> bool:
        """Whether a request with ``prompt_tokens`` tokens exceeds ``max_prompt_tokens``."""
        return self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens


class BudgetChecker:
    """Counts one channel's tokens; objects to everything past the first ``max_tokens``.

    Exact counting starts only when it can matter: every token is at least one byte, so the
    count never exceeds the tokens counted so far plus the UTF-8 bytes not yet counted. While
    that bound stays clear of the budget, text is kept aside uncounted and released; after
    that, the counter catches up in one call and counts every delta. Most answers stay clear
    of their budget to the end: they never make a counter at all.
    """

    __slots__ = (
        "_counter",
        "_encoding",
        "_fired",
        "_length",
        "_max",
        "_safe",
        "_uncounted",
        "_uncounted_bytes",
    )

    def __init__(self, encoding: BPEEncoding, max_tokens: int) -> None:
        self._encoding = encoding
        self._counter: TokenCounter | None = None  # made when the count nears the budget
        self._max = max_tokens
        self._length = 0
        self._safe = 0
        self._fired = False
        self._uncounted = TextLog()
        self._uncounted_bytes = 0

    def feed(self, text: str) -> Verdict:
        self._length += len(text)
        if self._fired:
            return Verdict(self._length)
        self._uncounted.append(text)
        self._uncounted_bytes += len(text.encode("utf-8", "surrogatepass"))
        if self._counted() + self._uncounted_bytes + NEAR_BUDGET_TOKENS <= self._max:
            self._safe = self._length
            return Verdict(self._length)
        counter = self._catch_up()
        count = counter.count
        # A count over the budget is final only once settled text alone is over it: the unsettled
        # tail can still merge into fewer tokens ("```pyt" is 3 tokens, "```python" is 2).
        if count > self._max and counter.count_prefix(counter.stable_length) > self._max:
            return self._cut(counter)
        if self._length - counter.stable_length > MAX_UNSETTLED_CHARS:
            raise ValueError(
                f"{self._length - counter.stable_length} characters in a row that the tokenizer cannot settle"
            )
        if count + NEAR_BUDGET_TOKENS <= self._max:
            self._safe = self._length
        else:
            self._safe = max(self._safe, counter.stable_prefix_for(self._max))
        return Verdict(self._safe)

    def finish(self) -> Verdict:
        if self._counted() + self._uncounted_bytes <= self._max:
            return Verdict(self._length)  # under the budget for certain: no need to count the rest
        counter = self._catch_up()
        if not self._fired and counter.count > self._max:
            return self._cut(counter)
        return Verdict(self._length)

    def _counted(self) -> int:
        """Tokens counted so far (the text kept aside not included)."""
        return 0 if self._counter is None else self._counter.count

    def _catch_up(self) -> TokenCounter:
        """Count the text kept aside (making the counter on first need)."""
        counter = self._counter
        if counter is None:
            counter = self._counter = TokenCounter(self._encoding)
        if self._uncounted:
            counter.feed(self._uncounted.take())
            self._uncounted_bytes = 0
        return counter

    def _cut(self, counter: TokenCounter) -> Verdict:
        self._fired = True
        cut = max(counter.prefix_for(self._max), self._safe)
        return Verdict(self._length, (Hit(cut, self._length, f"over {self._max} tokens"),))


class _NoBudget:
    """The checker of a rule that budgets only the prompt: it never objects to text."""

    __slots__ = ("_length",)

    def __init__(self) -> None:
        self._length = 0

    def feed(self, text: str) -> Verdict:
        self._length += len(text)
        return Verdict(self._length)

    def finish(self) -> Verdict:
        return Verdict(self._length)
