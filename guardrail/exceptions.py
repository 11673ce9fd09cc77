"""The exceptions guardrail raises, in one tree.

    GuardrailError                 base of everything below
    ├── ConfigError                rule files: every problem, each located as file:line: key.path: message
    ├── PluginError                a plugin rule that cannot be found, imported or built
    ├── StreamError                a stream the guard cannot read (the guard ends it in-dialect)
    │   ├── SSEError               malformed or oversized server-sent events
    │   └── UpstreamStreamError    the upstream broke off after the response had started
    ├── RuleError                  a rule failed while checking text (a pattern timed out, a plugin raised)
    ├── EncodingError              a tiktoken encoding that cannot be loaded or fails its checksum
    └── ListenError                ``guardrail serve`` cannot listen on its host and port (the port is taken)

Errors carry what happened, where, and what was found. Anything else escaping from the public
API is a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class GuardrailError(Exception):
    """Base class of all guardrail errors."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a rule file: where it is and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(GuardrailError):
    """One or more rule files are invalid. ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PluginError(GuardrailError):
    """A plugin rule class could not be found, imported or constructed."""


class StreamError(GuardrailError):
    """The stream coming from the app or upstream cannot be read."""


class SSEError(StreamError):
    """Malformed or oversized server-sent events."""


class UpstreamStreamError(StreamError):
    """The upstream failed after the response to the client had started.

    Raised by the proxy when the upstream connection breaks or times out mid-body. The status
    line has already gone out, so only the middleware around the app can still end the stream
    in a form the client's SDK reports as an error.
    """


class RuleError(GuardrailError):
    """A rule failed while checking text: a pattern ran past its timeout, or a plugin raised."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"rule {rule!r}: {message}")


class EncodingError(GuardrailError):
    """A tiktoken encoding could not be loaded, or its BPE file failed verification."""


class ListenError(GuardrailError):
    """``guardrail serve`` cannot listen on its host and port; the message says why and what to do."""
