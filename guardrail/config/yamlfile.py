"""Read a rule file as plain data (``yaml.safe_load`` semantics) while remembering line numbers.

PyYAML's constructor forgets where each value came from and silently keeps the last of two
equal keys. Here the node tree is composed with the safe loader and turned into plain Python
data by hand, recording the line of every mapping key and sequence item under its key path
(``("rules", 2, "patterns", 0)``), so that a problem found later can be reported at its line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from guardrail.config.paths import KeyPath, format_path
from guardrail.exceptions import ConfigProblem

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Rule files are a few kilobytes; a bigger file is a mistake (wrong file given) or hostile.
MAX_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """A parsed rule file: its data (None if unreadable), key-path lines and parse problems."""

    file: str
    data: object
    lines: Mapping[KeyPath, int]
    problems: tuple[ConfigProblem, ...]

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one (a missing key: its mapping)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


def read_yaml(file: str | os.PathLike[str]) -> YamlDocument:
    """Read and parse one YAML file, recording the line of every key and item.

    Args:
        file: the file's path; problems name it as given.

    Returns:
        The document. Unreadable files and YAML syntax errors give ``data=None`` and a problem;
        duplicate keys give a problem but keep the last value, as ``yaml.safe_load`` would.
    """
    name = os.fspath(file)
    try:
        with open(name, "rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        return _failed(name, None, f"cannot read the file: {exc.strerror or exc}")
    if len(raw) > MAX_FILE_BYTES:
        return _failed(name, None, f"the file is over {MAX_FILE_BYTES // 1024} KiB; is it really a rule file?")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return _failed(name, line, f"not valid UTF-8 (byte {exc.start}): rule files are UTF-8 text")
    return parse_yaml(text, name)


def parse_yaml(text: str, file: str) -> YamlDocument:
    """Parse YAML text (see :func:`read_yaml`); ``file`` is only used to name problems."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        return _failed(file, _mark_line(exc), _yaml_message(exc))
    except yaml.YAMLError as exc:
        return _failed(file, None, f"invalid YAML: {exc}")
    if root is None:
        return _failed(file, None, "the file is empty; a rule file is a mapping with 'version: 1' and 'rules'")
    builder = _DataBuilder(file)
    try:
        data = builder.build(root, ())
    except ConstructorError as exc:
        return _failed(file, _mark_line(exc), _yaml_message(exc))
    except RecursionError:
        return _failed(file, root.start_mark.line + 1, "the YAML is nested too deeply")
    return YamlDocument(file, data, builder.lines, tuple(builder.problems))


def _failed(file: str, line: int | None, message: str) -> YamlDocument:
    return YamlDocument(file, None, {}, (ConfigProblem(file, line, "", message),))


def _mark_line(exc: yaml.MarkedYAMLError) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return mark.line + 1 if mark is not None else None


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    parts = [part for part in (exc.context, exc.problem) if part]
    message = "invalid YAML: " + ", ".join(parts) if parts else "invalid YAML"
    mark = exc.problem_mark or exc.context_mark
    return f"{message} (column {mark.column + 1})" if mark is not None else message


class _DataBuilder:
    """Turns composed nodes into dicts, lists and scalars, recording lines as it goes."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[KeyPath, int] = {}
        self.problems: list[ConfigProblem] = []
        self._constructor = SafeConstructor()
        # An alias is the same node object again. Building it once and sharing the result, as
        # safe_load does, keeps "billion laughs" files linear; its inner lines are those of the anchor.
        self._built: dict[int, object] = {}

    def build(self, node: Node, path: KeyPath) -> object:
        self.lines.setdefault(path, node.start_mark.line + 1)
        known = self._built.get(id(node))
        if known is not None:
            return known
        if isinstance(node, MappingNode) and node.tag == _MAP_TAG:
            mapping: dict[object, object] = {}
            self._built[id(node)] = mapping
            self._fill_mapping(mapping, node, path)
            return mapping
        if isinstance(node, SequenceNode) and node.tag == _SEQ_TAG:
            items: list[object] = []
            self._built[id(node)] = items
            items.extend(self.build(item, (*path, index)) for index, item in enumerate(node.value))
            return items
        value = self._construct(node)
        self._built[id(node)] = value
        return value

    def _construct(self, node: Node) -> object:
        """Scalars, and the rarer tagged collections (!!set, !!omap), as safe_load builds them."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except ConstructorError:
            raise
        except (ValueError, TypeError) as exc:  # e.g. a timestamp like 2024-13-45
            raise ConstructorError(None, None, f"cannot read {node.value!r}: {exc}", node.start_mark) from exc

    def _fill_mapping(self, mapping: dict[object, object], node: MappingNode, path: KeyPath) -> None:
        first_line: dict[object, int] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            line = key_node.start_mark.line + 1
            if key in first_line:
                self._problem((*path, key), line, f"duplicate key {key!r}; the first is at line {first_line[key]}")
            first_line.setdefault(key, line)
            self.lines[(*path, key)] = line
            mapping[key] = self.build(value_node, (*path, key))
        for merged in merges:
            self._merge(mapping, merged, path)

    def _merge(self, mapping: dict[object, object], node: Node, path: KeyPath) -> None:
        """``<<: *anchor`` (or a list of them): copy keys the mapping does not set itself."""
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            value = self.build(source, path)
            if not isinstance(value, dict):
                self._problem(path, source.start_mark.line + 1, "'<<' merges only mappings")
                continue
            for key, item in value.items():
                mapping.setdefault(key, item)

    def _key(self, node: Node, path: KeyPath) -> object:
        if not isinstance(node, ScalarNode):
            self._problem(path, node.start_mark.line + 1, "mapping keys must be plain scalars")
            return None
        return self._construct(node)

    def _problem(self, path: KeyPath, line: int, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, line, format_path(path), message))
