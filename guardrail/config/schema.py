"""The rule file schema, version 1, as closed pydantic models (an unknown key is an error).

Adding a built-in rule type takes one spec model (a subclass of :class:`RuleSpec` with
``type: Literal["its_name"]`` and its own keys) and one builder function turning that spec into
a :class:`~guardrail.core.rule.Rule`, registered together in :data:`BUILTIN_TYPES`. The rule
union, the JSON Schema and the error messages follow from that table. Any other ``type`` is a
plugin (see :mod:`guardrail.config.plugins`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Generic, Literal, TypeVar, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from guardrail.config.paths import found
from guardrail.config.ruleset import DEFAULT_TOKENIZER
from guardrail.config.urls import url_problem
from guardrail.core.rule import Rule, TimedRule
from guardrail.exceptions import EncodingError
from guardrail.rules.banned import BannedPatterns, compile_pattern
from guardrail.rules.budget import TokenBudget
from guardrail.rules.timeout import IdleTimeout
from guardrail.tokenizers import encoding_name_for, get_encoding

SCHEMA_VERSION: Final = 1

# Rule names become the `rule` label of every metric, so they stay short and plain.
RULE_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
RULE_NAME_RULE: Final = (
    "rule names are 1 to 64 characters: lowercase letters, digits, '_', '.' and '-', "
    "starting with a letter or digit (they become metric labels)"
)
_RULE_NAME = re.compile(RULE_NAME_PATTERN)

# The discriminator tag of plugin rules; built-in rules are tagged with their type name.
PLUGIN_TAG: Final = "plugin"
# The error type reported when a rule has no usable `type` to pick its model by.
RULE_TYPE_ERROR: Final = "rule_type"

ActionName = Literal["abort", "fallback", "redact", "log"]


def _check_version(value: object) -> object:
    # Literal[1] alone would take `true` (True == 1) and say nothing about what is supported.
    if type(value) is not int or value != SCHEMA_VERSION:
        raise PydanticCustomError(
            "version",
            "unsupported version {found}; this guardrail reads rule files with 'version: 1'",
            {"found": found(value)},
        )
    return value


def _check_rule_name(name: str) -> str:
    if not _RULE_NAME.match(name):
        raise PydanticCustomError("rule_name", "{rule}; found {found}", {"rule": RULE_NAME_RULE, "found": repr(name)})
    return name


def _check_path_glob(glob: str) -> str:
    if not glob.startswith(("/", "*")):
        raise PydanticCustomError(
            "path_glob", "a path glob starts with '/' or '*' (request paths do); found {found}", {"found": repr(glob)}
        )
    return glob


def _check_pattern(pattern: str) -> str:
    try:
        compile_pattern(pattern)
    except ValueError as exc:
        raise PydanticCustomError("bad_pattern", "{reason}", {"reason": str(exc)}) from None
    return pattern


def _check_phrase(phrase: str) -> str:
    if not phrase.strip():
        raise PydanticCustomError("empty_phrase", "a phrase cannot be empty")
    return phrase


def _check_url(url: str) -> str:
    problem = url_problem(url)
    if problem is not None:
        raise PydanticCustomError("url", "{problem}", {"problem": problem})
    return url


NonEmpty = Annotated[str, Field(min_length=1)]
RuleName = Annotated[str, AfterValidator(_check_rule_name), Field(json_schema_extra={"pattern": RULE_NAME_PATTERN})]
PathGlob = Annotated[str, AfterValidator(_check_path_glob)]
Pattern = Annotated[str, AfterValidator(_check_pattern)]
Phrase = Annotated[str, AfterValidator(_check_phrase)]
Url = Annotated[str, AfterValidator(_check_url)]


def _check_tokenizer(value: str) -> str:
    try:
        encoding_name_for(value)
    except EncodingError as exc:
        raise PydanticCustomError("tokenizer", "{problem}", {"problem": str(exc)}) from None
    return value


Tokenizer = Annotated[str, Field(min_length=1), AfterValidator(_check_tokenizer)]


class _Closed(BaseModel):
    # strict: YAML already gives real booleans and numbers, so "yes" or "400" in quotes is a mistake.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RuleSpec(_Closed):
    """The keys every rule has. Subclasses add their type's keys."""

    name: RuleName = Field(description="Unique name; the `rule` label in metrics.")
    type: NonEmpty = Field(description="A built-in type, a plugin's 'package.module:Class', or an entry point name.")
    action: ActionName = Field(description="What happens when the rule fires.")
    fallback: NonEmpty | None = Field(
        default=None, description="With action 'fallback': the name of an entry in `fallbacks`."
    )
    replacement: str = Field(default="[redacted]", description="With action 'redact': the text put in its place.")
    holdback: bool = Field(
        default=True, description="Hold text the rule may still object to; false: release at once, trip after."
    )


class BannedPatternsSpec(RuleSpec):
    """``banned_patterns``: regexes and literal phrases that must never reach the client."""

    type: Literal["banned_patterns"]
    patterns: list[Pattern] = Field(default_factory=list, description="Regexes, `regex` module syntax.")
    phrases: list[Phrase] = Field(
        default_factory=list, description="Literal phrases, case-insensitive and word-bounded."
    )
    normalize: bool = Field(
        default=False,
        description="Match through Unicode tricks: ignore zero-width and other default-ignorable characters, "
        "fold compatibility forms (fullwidth letters, ligatures) and drop combining marks.",
    )

    @model_validator(mode="after")
    def _needs_something_to_ban(self) -> BannedPatternsSpec:
        if not self.patterns and not self.phrases:
            raise PydanticCustomError("nothing_banned", "banned_patterns needs at least one of 'patterns' or 'phrases'")
        return self


Seconds = Annotated[float, Field(gt=0, strict=False)]


class IdleTimeoutSpec(RuleSpec):
    """``idle_timeout``: limits on silences between deltas with text, on the first one, and on the whole."""

    type: Literal["idle_timeout"]
    seconds: Seconds = Field(description="Longest gap between deltas with text; keep-alive comments don't count.")
    first_token_seconds: Seconds | None = Field(default=None, description="How long the first delta may take.")
    total_seconds: Seconds | None = Field(default=None, description="How long the whole stream may take.")

    @model_validator(mode="after")
    def _no_redaction(self) -> IdleTimeoutSpec:
        if self.action == "redact":
            raise PydanticCustomError(
                "timeout_action", "idle_timeout takes action abort, fallback or log; found 'redact'"
            )
        return self


Tokens = Annotated[int, Field(ge=0)]


class TokenBudgetSpec(RuleSpec):
    """``token_budget``: completion tokens per channel, and prompt tokens per request, counted exactly."""

    type: Literal["token_budget"]
    max_tokens: Tokens | None = Field(default=None, description="Completion tokens the client may receive.")
    max_prompt_tokens: Tokens | None = Field(default=None, description="Prompt tokens a request may have.")

    @model_validator(mode="after")
    def _a_budget(self) -> TokenBudgetSpec:
        if self.max_tokens is None and self.max_prompt_tokens is None:
            raise PydanticCustomError("no_budget", "token_budget needs max_tokens, max_prompt_tokens or both")
        if self.action == "redact":
            raise PydanticCustomError(
                "budget_action", "token_budget takes action abort, fallback or log; found 'redact'"
            )
        return self


def _not_a_builtin_type(schema: dict[str, Any]) -> None:
    # Run when the JSON Schema is generated, so it sees every type registered in BUILTIN_TYPES.
    schema["properties"]["type"]["not"] = {"enum": list(BUILTIN_TYPES)}


class PluginRuleSpec(RuleSpec):
    """A plugin rule: ``type`` names its class; ``options`` are passed to it as keyword arguments."""

    model_config = ConfigDict(json_schema_extra=_not_a_builtin_type)

    type: NonEmpty = Field(
        description="'package.module:Class', or the name of an entry point in the 'guardrail.rules' group."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the plugin class.")


class FinalAnswerOnlySpec(_Closed):
    """Which answers stream their final answer only, and whether tool calls are held back too."""

    paths: list[PathGlob] = Field(
        default_factory=list, description="Path globs where it applies; empty: every path the file guards."
    )
    tool_calls: bool = Field(default=False, description="Also keep tool calls from the client (checked, counted).")


class FallbackSpec(_Closed):
    """A fallback answer: fixed ``text``, or another upstream ``url`` (and optional ``model``)."""

    text: NonEmpty | None = Field(default=None, description="A fixed answer, streamed in the stream's dialect.")
    url: Url | None = Field(
        default=None,
        description="Another upstream, called with the original request: a base URL as for --upstream "
        "(http://host/v1) or an endpoint (http://host/v1/chat/completions).",
    )
    model: NonEmpty | None = Field(default=None, description="With `url`: the model to ask for instead.")
    separator: str | None = Field(
        default=None,
        description="With `text`: what goes between the text the client already received and the fallback's "
        '(default a blank line, "\\n\\n"; "" glues them).',
    )

    @model_validator(mode="after")
    def _text_or_url(self) -> FallbackSpec:
        if (self.text is None) == (self.url is None):
            raise PydanticCustomError(
                "fallback_kind", "a fallback has exactly one of 'text' (a fixed answer) or 'url' (another upstream)"
            )
        if self.model is not None and self.url is None:
            raise PydanticCustomError("fallback_model", "'model' only applies to a fallback with 'url'")
        if self.separator is not None and self.text is None:
            raise PydanticCustomError("fallback_separator", "'separator' only applies to a fallback with 'text'")
        return self


SpecT = TypeVar("SpecT", bound=RuleSpec)


@dataclass(frozen=True, slots=True)
class BuiltinType(Generic[SpecT]):
    """A built-in rule type: its spec model and the function building its rule from a valid spec.

    ``build`` may raise ``ValueError``; the message is reported at the rule.
    """

    spec: type[SpecT]
    build: Callable[[SpecT, str], Rule | TimedRule]  # (spec, the file's tokenizer)
    counts_tokens: bool = False  # built only when the file's tokenizer is valid (reported once, there)


def _build_banned_patterns(spec: BannedPatternsSpec, tokenizer: str) -> Rule:
    return BannedPatterns(patterns=spec.patterns, phrases=spec.phrases, normalize=spec.normalize)


def _build_token_budget(spec: TokenBudgetSpec, tokenizer: str) -> Rule:
    try:
        encoding = get_encoding(tokenizer)
    except EncodingError as exc:
        raise ValueError(str(exc)) from exc
    return TokenBudget(encoding, max_tokens=spec.max_tokens, max_prompt_tokens=spec.max_prompt_tokens)


def _build_idle_timeout(spec: IdleTimeoutSpec, tokenizer: str) -> TimedRule:
    return IdleTimeout(spec.seconds, spec.first_token_seconds, spec.total_seconds)


BUILTIN_TYPES: Final[Mapping[str, BuiltinType[Any]]] = {
    "banned_patterns": BuiltinType(BannedPatternsSpec, _build_banned_patterns),
    "idle_timeout": BuiltinType(IdleTimeoutSpec, _build_idle_timeout),
    "token_budget": BuiltinType(TokenBudgetSpec, _build_token_budget, counts_tokens=True),
}


def _rule_tag(value: object) -> str | None:
    """Which model validates a rule: its built-in type, else the plugin model."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):
        return None
    return kind if kind in BUILTIN_TYPES else PLUGIN_TAG


def _rule_union() -> Any:
    members = [Annotated[entry.spec, Tag(name)] for name, entry in BUILTIN_TYPES.items()]
    members.append(Annotated[PluginRuleSpec, Tag(PLUGIN_TAG)])
    return Annotated[
        Union[tuple(members)],  # noqa: UP007 - built from the table at run time
        Discriminator(_rule_tag, custom_error_type=RULE_TYPE_ERROR, custom_error_message="a rule needs a 'type'"),
    ]


if TYPE_CHECKING:
    AnyRuleSpec = RuleSpec
else:
    AnyRuleSpec = _rule_union()

# The model of each discriminator tag, to name the keys allowed where an unknown one was found.
RULE_MODELS: Final[Mapping[str, type[RuleSpec]]] = {
    **{name: entry.spec for name, entry in BUILTIN_TYPES.items()},
    PLUGIN_TAG: PluginRuleSpec,
}


class RuleFileSpec(_Closed):
    """A rule file, schema version 1."""

    model_config = ConfigDict(title="guardrail rule file")

    version: Annotated[Literal[1], BeforeValidator(_check_version)] = Field(description="Schema version: 1.")
    tokenizer: Tokenizer = Field(default=DEFAULT_TOKENIZER, description="tiktoken encoding or model name.")
    paths: list[PathGlob] = Field(
        default_factory=list, description="Request path globs ('*' crosses '/') this file guards; empty: every path."
    )
    rules: list[AnyRuleSpec] = Field(description="The rules, checked after every delta.")
    fallbacks: dict[NonEmpty, FallbackSpec] = Field(
        default_factory=dict, description="Named fallback answers for rules with action 'fallback'."
    )
    dialects: dict[PathGlob, DialectName] = Field(
        default_factory=dict,
        description="Path glob: the dialect its answers are read in, where the endpoint's path does not say.",
    )
    pass_unreadable: list[PathGlob] = Field(
        default_factory=list,
        description="Path globs whose answers the guard cannot read (other encodings, binary types) "
        "pass unguarded instead of being refused.",
    )
    final_answer_only: bool | FinalAnswerOnlySpec = Field(
        default=False,
        description="Stream only the final answer: reasoning (and with tool_calls, tool calls) is checked by the "
        "rules and counted, but never sent to the client.",
    )
    allow_empty: bool = Field(
        default=False, description="A file without rules is an error unless it says so with true."
    )


def _check_dialect(value: str) -> str:
    from guardrail.core.dialects import DIALECTS

    if value not in DIALECTS:
        raise PydanticCustomError(
            "dialect", "unknown dialect {found}; known: {known}", {"found": repr(value), "known": ", ".join(DIALECTS)}
        )
    return value


DialectName = Annotated[str, AfterValidator(_check_dialect)]


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a rule file, for editors (``guardrail check --schema``).

    Returns:
        The schema as a JSON-ready dict.
    """
    schema = RuleFileSpec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
