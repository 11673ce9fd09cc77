"""Turn pydantic's validation errors into located problems: ``file:line: key.path: message``.

pydantic reports a location tuple (``loc``) per error, with the discriminator tag it chose
inserted after a rule's index (``("rules", 2, "banned_patterns", "patterns", 0)``). The tag is
dropped to get the key path in the file, and the path is looked up in the lines recorded while
reading the YAML. Messages are rewritten to say what was expected and what was found.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from pydantic_core.core_schema import ErrorType

from guardrail.config.paths import KeyPath, format_path, found
from guardrail.config.schema import BUILTIN_TYPES, RULE_MODELS, RULE_TYPE_ERROR, FallbackSpec, RuleFileSpec
from guardrail.config.yamlfile import YamlDocument
from guardrail.exceptions import ConfigProblem

_PYDANTIC_ERRORS = frozenset(get_args(ErrorType))

_TYPE_NAMES = {
    "string_type": "a string",
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def validation_problems(error: ValidationError, doc: YamlDocument) -> list[ConfigProblem]:
    """One located problem per pydantic error.

    Args:
        error: what validating ``doc.data`` against :class:`RuleFileSpec` raised.
        doc: the document, for its file name and recorded lines.

    Returns:
        The problems, in pydantic's order.
    """
    problems = []
    for detail in error.errors(include_url=False):
        tagged = tuple(detail["loc"])
        path, message = _describe(detail, tagged, _untag(tagged))
        problems.append(ConfigProblem(doc.file, doc.line_of(path), format_path(path), message))
    return problems


def _untag(loc: KeyPath) -> KeyPath:
    if len(loc) >= 3 and loc[0] == "rules" and isinstance(loc[1], int) and loc[2] in RULE_MODELS:
        return (*loc[:2], *loc[3:])
    return loc


def _describe(detail: ErrorDetails, tagged: KeyPath, path: KeyPath) -> tuple[KeyPath, str]:
    kind = detail["type"]
    value = detail["input"]
    if kind == "missing":
        return path[:-1], f"missing required key {path[-1]!r}"
    if kind == "extra_forbidden":
        return path, _unknown_key(path[-1], _allowed_keys(tagged[:-1]))
    if kind == RULE_TYPE_ERROR:
        return _describe_rule_type(path, value)
    if kind in _TYPE_NAMES:
        return path, f"expected {_TYPE_NAMES[kind]}; found {found(value)}"
    if kind == "literal_error":
        expected = detail.get("ctx", {}).get("expected", "")
        return path, f"expected one of {expected}; found {found(value)}"
    if kind == "string_too_short":
        return path, "cannot be empty"
    message = detail["msg"]
    if kind not in _PYDANTIC_ERRORS:
        return path, message  # one of the schema's own errors, which say what they found
    return path, f"{message[:1].lower()}{message[1:]}; found {found(value)}"


def _describe_rule_type(path: KeyPath, value: object) -> tuple[KeyPath, str]:
    if not isinstance(value, dict):
        return path, f"a rule is a mapping with 'name', 'type' and 'action'; found {found(value)}"
    builtins = ", ".join(BUILTIN_TYPES)
    if "type" not in value:
        return path, f"missing required key 'type' (built-in: {builtins}; or a plugin 'package.module:Class')"
    return (*path, "type"), f"expected a string; found {found(value['type'])}"


def _allowed_keys(tagged_parent: KeyPath) -> Sequence[str]:
    model: type[BaseModel] | None = None
    if tagged_parent == ():
        model = RuleFileSpec
    elif len(tagged_parent) == 3 and tagged_parent[0] == "rules" and isinstance(tagged_parent[2], str):
        model = RULE_MODELS.get(tagged_parent[2])
    elif len(tagged_parent) == 2 and tagged_parent[0] == "fallbacks":
        model = FallbackSpec
    return list(model.model_fields) if model is not None else []


def _unknown_key(key: Any, allowed: Sequence[str]) -> str:
    message = f"unknown key {key!r}"
    if not allowed:
        return message
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.75)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    return f"{message}; allowed here: {', '.join(allowed)}"
