"""Plugin rules: find the class a rule file's ``type`` names, build it, check it is a Rule.

``type`` is either an import path, ``"package.module:Class"`` (the attribute may be dotted), or
a bare name registered by an installed package in the ``guardrail.rules`` entry-point group::

    [project.entry-points."guardrail.rules"]
    repetition = "guardrail_repetition:RepetitionRule"

The class is called with the rule's ``options`` as keyword arguments. Every failure is a
:class:`~guardrail.exceptions.PluginError` whose message names the plugin; the loader locates it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points

from guardrail.core.rule import Rule
from guardrail.exceptions import PluginError

ENTRY_POINT_GROUP = "guardrail.rules"

_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")

PluginFactory = Callable[..., object]


def installed_plugins() -> list[str]:
    """The names registered in the ``guardrail.rules`` entry-point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def find_plugin(type_name: str, builtin_types: Iterable[str]) -> PluginFactory:
    """The class (or factory) a rule's ``type`` names.

    Args:
        type_name: ``"package.module:Class"`` or an entry point name.
        builtin_types: the built-in type names, listed when ``type_name`` is unknown.

    Returns:
        The callable to build the rule with.

    Raises:
        PluginError: the name is unknown, its module cannot be imported, or the attribute is missing.
    """
    if ":" in type_name:
        return _from_import_path(type_name)
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name]
    if not matches:
        plugins = ", ".join(installed_plugins()) or "none"
        hint = " (a plugin class is named as 'package.module:Class')" if "." in type_name else ""
        raise PluginError(
            f"unknown rule type {type_name!r}{hint}; built-in types: {', '.join(builtin_types)}; "
            f"installed plugins: {plugins}"
        )
    if len({ep.value for ep in matches}) > 1:
        values = ", ".join(sorted({ep.value for ep in matches}))
        raise PluginError(f"plugin {type_name!r} is registered by several packages ({values}); use an import path")
    return _from_entry_point(matches[0])


def build_plugin(factory: PluginFactory, type_name: str, options: Mapping[str, object]) -> object:
    """Call the plugin's class with the rule's options as keyword arguments.

    Raises:
        PluginError: the constructor raised (unknown or missing option, a bad value).
    """
    try:
        return factory(**options)
    except Exception as exc:
        raise PluginError(f"plugin {type_name!r} rejected its options: {_describe(exc)}") from exc


def ensure_rule(built: object, type_name: str) -> Rule:
    """``built`` itself, once it is known to implement :class:`~guardrail.core.rule.Rule`.

    Raises:
        PluginError: it has no callable ``checker()``.
    """
    # Rule is a runtime-checkable protocol: isinstance() only sees that the attribute exists.
    if isinstance(built, Rule) and callable(built.checker):
        return built
    raise PluginError(
        f"plugin {type_name!r} gave an instance of {type(built).__name__}, which is not a rule: "
        "it has no checker() method"
    )


def _from_import_path(type_name: str) -> PluginFactory:
    if not _IMPORT_PATH.fullmatch(type_name):
        raise PluginError(f"plugin type {type_name!r} is not an import path of the form 'package.module:Class'")
    module_name, _, attribute = type_name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginError(
                f"plugin {type_name!r}: no module named {exc.name!r} (is it installed, or on PYTHONPATH?)"
            ) from exc
        raise PluginError(f"plugin {type_name!r}: importing {module_name!r} failed: {_describe(exc)}") from exc
    except Exception as exc:
        raise PluginError(f"plugin {type_name!r}: importing {module_name!r} failed: {_describe(exc)}") from exc
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise PluginError(f"plugin {type_name!r}: module {module_name!r} has no attribute {attribute!r}") from None
    return _callable(target, repr(type_name))


def _from_entry_point(entry_point: EntryPoint) -> PluginFactory:
    label = f"{entry_point.name!r} (entry point {entry_point.value!r})"
    try:
        target = entry_point.load()
    except Exception as exc:
        raise PluginError(f"plugin {label} cannot be loaded: {_describe(exc)}") from exc
    return _callable(target, label)


def _callable(target: object, label: str) -> PluginFactory:
    if not callable(target):
        raise PluginError(f"plugin {label} is an instance of {type(target).__name__}, not a class")
    return target


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
