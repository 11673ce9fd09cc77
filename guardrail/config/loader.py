"""Load rule files into a :class:`RuleSet`, reporting every problem of every file at once.

Each file is read with its lines (:mod:`guardrail.config.yamlfile`), then checked three ways
that do not depend on one another, so that one mistake never hides the next:

1. cross-checks on the raw data: rule names unique across all files, fallback references;
2. the closed pydantic schema (:mod:`guardrail.config.schema`), errors located by key path;
3. building each rule that validates on its own: regexes compiled, plugins imported and built.

A file with no problems becomes a :class:`RuleGroup`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from pydantic import TypeAdapter, ValidationError

from guardrail.config.paths import KeyPath, format_path, found
from guardrail.config.plugins import PluginFactory, build_plugin, ensure_rule, find_plugin
from guardrail.config.problems import validation_problems
from guardrail.config.ruleset import DEFAULT_TOKENIZER, RuleGroup, RuleSet
from guardrail.config.schema import BUILTIN_TYPES, AnyRuleSpec, PluginRuleSpec, RuleFileSpec, RuleSpec
from guardrail.config.yamlfile import YamlDocument, read_yaml
from guardrail.core.rule import Action, BoundRule, Fallback, Rule, TimedRule
from guardrail.exceptions import ConfigError, ConfigProblem, EncodingError, PluginError
from guardrail.tokenizers import encoding_name_for

RuleSource = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | RuleSet


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What loading some rule files gave: a group per valid file, and every problem found."""

    groups: tuple[RuleGroup, ...]
    problems: tuple[ConfigProblem, ...]


def load_rules(source: RuleSource) -> RuleSet:
    """Load and compile rule files.

    Args:
        source: a rule file's path, a sequence of paths (their rules are combined), or an already
            loaded :class:`RuleSet` (returned as is).

    Returns:
        The compiled rule set: one group per file, in the order given.

    Raises:
        ConfigError: any file is invalid; ``problems`` lists every problem of every file.
    """
    if isinstance(source, RuleSet):
        return source
    paths = [source] if isinstance(source, str | os.PathLike) else list(source)
    result = compile_files(paths)
    if result.problems:
        raise ConfigError(result.problems)
    return RuleSet(result.groups)


def check_files(paths: Sequence[str | os.PathLike[str]]) -> list[ConfigProblem]:
    """Validate rule files as :func:`load_rules` would, without raising.

    Args:
        paths: the files, checked together (rule names must be unique across them).

    Returns:
        Every problem found, sorted by file (in the order given), then line; empty if all are valid.
    """
    return list(compile_files(paths).problems)


def compile_files(paths: Sequence[str | os.PathLike[str]]) -> LoadResult:
    """Validate and compile rule files, collecting every problem (what ``guardrail check`` shows).

    Args:
        paths: the files, checked together (rule names must be unique across them).

    Returns:
        A group for each file without problems, and all problems sorted by file, then line.
    """
    names: dict[str, tuple[str, int | None]] = {}
    groups: list[RuleGroup] = []
    problems: list[tuple[int, ConfigProblem]] = []
    for index, path in enumerate(paths):
        group, file_problems = _compile_file(read_yaml(path), names)
        problems.extend((index, problem) for problem in file_problems)
        if group is not None:
            groups.append(group)
    problems.sort(key=lambda item: (item[0], item[1].line or 0))
    return LoadResult(tuple(groups), tuple(problem for _, problem in problems))


def _compile_file(
    doc: YamlDocument, names: dict[str, tuple[str, int | None]]
) -> tuple[RuleGroup | None, list[ConfigProblem]]:
    problems = list(doc.problems)
    if doc.data is None:
        return None, problems
    if not isinstance(doc.data, dict):
        message = f"a rule file is a mapping with 'version: 1' and 'rules'; found {found(doc.data)}"
        return None, [*problems, ConfigProblem(doc.file, doc.line_of(()), "", message)]
    problems += _check_rule_names(doc, names)
    problems += _check_fallback_references(doc)
    spec: RuleFileSpec | None = None
    try:
        spec = RuleFileSpec.model_validate(doc.data)
    except ValidationError as exc:
        problems += validation_problems(exc, doc)
    built, build_problems = _build_rules(doc)
    problems += build_problems
    if not problems and spec is not None and not spec.rules and not spec.allow_empty:
        # A file cut before its rules (an editor or a deploy still writing it) looks like this.
        message = "the file has no rules, so it guards nothing; add rules, or set allow_empty: true"
        problems.append(_problem(doc, ("rules",), message))
    if problems or spec is None:
        return None, problems
    return _group(spec, built, doc.file), problems


def _problem(doc: YamlDocument, path: KeyPath, message: str) -> ConfigProblem:
    return ConfigProblem(doc.file, doc.line_of(path), format_path(path), message)


def _raw_rules(doc: YamlDocument) -> Iterator[tuple[int, Mapping[object, object]]]:
    """The rules that are mappings, with their index: cross-checks look at what is there."""
    assert isinstance(doc.data, dict)
    rules = doc.data.get("rules")
    if isinstance(rules, list):
        yield from ((index, rule) for index, rule in enumerate(rules) if isinstance(rule, dict))


def _check_rule_names(doc: YamlDocument, names: dict[str, tuple[str, int | None]]) -> list[ConfigProblem]:
    """Rule names are metric labels, so they must be unique across every loaded file."""
    problems = []
    for index, rule in _raw_rules(doc):
        name = rule.get("name")
        if not isinstance(name, str):
            continue
        line = doc.line_of(("rules", index, "name"))
        if name in names:
            file, first_line = names[name]
            where = f"line {first_line}" if file == doc.file else f"{file}:{first_line}"
            message = f"duplicate rule name {name!r}; it is already used at {where} (names must be unique)"
            problems.append(_problem(doc, ("rules", index, "name"), message))
        else:
            names[name] = (doc.file, line)
    return problems


def _check_fallback_references(doc: YamlDocument) -> list[ConfigProblem]:
    assert isinstance(doc.data, dict)
    fallbacks = doc.data.get("fallbacks")
    defined = [name for name in fallbacks if isinstance(name, str)] if isinstance(fallbacks, dict) else []
    listed = f"defined fallbacks: {', '.join(defined)}" if defined else "the file has no 'fallbacks' section"
    problems = []
    for index, rule in _raw_rules(doc):
        action, reference = rule.get("action"), rule.get("fallback")
        if action == "fallback" and "fallback" not in rule:
            message = f"action 'fallback' needs a 'fallback' key naming the answer to give; {listed}"
            problems.append(_problem(doc, ("rules", index), message))
        elif "fallback" in rule and isinstance(action, str) and action != "fallback":
            message = f"'fallback' only applies to action 'fallback'; this rule's action is {action!r}"
            problems.append(_problem(doc, ("rules", index, "fallback"), message))
        if isinstance(reference, str) and reference and reference not in defined:
            message = f"unknown fallback {reference!r}; {listed}"
            problems.append(_problem(doc, ("rules", index, "fallback"), message))
    return problems


@functools.cache
def _rule_adapter() -> TypeAdapter[RuleSpec]:
    return TypeAdapter(AnyRuleSpec)


def _build_rules(doc: YamlDocument) -> tuple[dict[int, Rule | TimedRule], list[ConfigProblem]]:
    """Build every rule that is valid by itself, even when others are not, to report all problems."""
    built: dict[int, Rule | TimedRule] = {}
    problems: list[ConfigProblem] = []
    for index, raw in _raw_rules(doc):
        try:
            # A plugin that cannot be found is worth reporting even when the rule has other problems.
            factory = _find_plugin(raw.get("type"), index)
            try:
                spec = _rule_adapter().validate_python(raw)
            except ValidationError:
                continue  # already reported by the file's validation
            if factory is None and BUILTIN_TYPES[spec.type].counts_tokens and not _known_tokenizer(doc):
                continue  # the tokenizer is reported at its own line
            built[index] = _build_rule(spec, factory, index, _tokenizer_of(doc))
        except _LocatedError as exc:
            problems.append(_problem(doc, exc.path, exc.message))
    return built, problems


class _LocatedError(Exception):
    def __init__(self, path: KeyPath, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _find_plugin(type_name: object, index: int) -> PluginFactory | None:
    if not isinstance(type_name, str) or not type_name or type_name in BUILTIN_TYPES:
        return None
    try:
        return find_plugin(type_name, BUILTIN_TYPES)
    except PluginError as exc:
        raise _LocatedError(("rules", index, "type"), str(exc)) from exc


def _known_tokenizer(doc: YamlDocument) -> bool:
    try:
        encoding_name_for(_tokenizer_of(doc))
    except EncodingError:
        return False
    return True


def _tokenizer_of(doc: YamlDocument) -> str:
    tokenizer = doc.data.get("tokenizer") if isinstance(doc.data, dict) else None
    return tokenizer if isinstance(tokenizer, str) else DEFAULT_TOKENIZER


def _build_rule(spec: RuleSpec, factory: PluginFactory | None, index: int, tokenizer: str) -> Rule | TimedRule:
    if factory is None:
        try:
            return BUILTIN_TYPES[spec.type].build(spec, tokenizer)
        except ValueError as exc:
            raise _LocatedError(("rules", index), f"cannot build the rule: {exc}") from exc
    assert isinstance(spec, PluginRuleSpec)
    try:
        built = build_plugin(factory, spec.type, spec.options)
    except PluginError as exc:
        raise _LocatedError(("rules", index, "options"), str(exc)) from exc
    try:
        return ensure_rule(built, spec.type)
    except PluginError as exc:
        raise _LocatedError(("rules", index, "type"), str(exc)) from exc


def _group(spec: RuleFileSpec, built: Mapping[int, Rule | TimedRule], source: str) -> RuleGroup:
    rules = tuple(
        BoundRule(
            name=rule.name,
            rule=built[index],
            action=Action(rule.action),
            holdback=rule.holdback,
            replacement=rule.replacement,
            fallback=_fallback(spec, rule.fallback),
            source=source,
        )
        for index, rule in enumerate(spec.rules)
    )
    return RuleGroup(
        source,
        tuple(spec.paths),
        spec.tokenizer,
        rules,
        dialects=tuple(spec.dialects.items()),
        pass_unreadable=tuple(spec.pass_unreadable),
        final_answer_only=_final_answer_only(spec),
    )


def _final_answer_only(spec: RuleFileSpec) -> tuple[tuple[str, ...], bool] | None:
    """(path globs, whether tool calls are hidden too), or None when the file streams everything."""
    option = spec.final_answer_only
    if option is False:
        return None
    if option is True:
        return (), False
    return tuple(option.paths), option.tool_calls


def _fallback(spec: RuleFileSpec, name: str | None) -> Fallback | None:
    if name is None:
        return None
    answer = spec.fallbacks[name]
    if answer.separator is not None:
        return Fallback(name, text=answer.text, separator=answer.separator)
    return Fallback(name, text=answer.text, url=answer.url, model=answer.model)
