"""JSON for the wire: reading untrusted events, writing events, and finding every string in them.

Events come from apps and upstreams the guard does not trust: JSON nested too deep for the
parsers is refused as :class:`Malformed` rather than raising ``RecursionError``, so is an
object that repeats a key (parsers disagree on which of its values counts, and the one the
guard did not read would reach the client in the event's bytes), every walk over a parsed event
is iterative, and what is written escapes the characters some clients split lines on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

_LINE_SEPARATORS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


class Malformed(ValueError):
    """Data that is not JSON the guard can read (invalid, or nested too deep)."""


def loads(data: str | bytes) -> Any:
    """Parse ``data``; raises :class:`Malformed` for invalid JSON, nesting the parsers refuse, or
    an object that repeats a key."""
    if not isinstance(data, (str, bytes)):
        data = bytes(data)  # (a bytearray or memoryview, read as the bytes it holds)
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:  # accepts what orjson refuses, such as a lone surrogate escape; as UTF-8 only, as JSON is sent
            value = json.loads(data.decode() if isinstance(data, bytes) else data)
        except (ValueError, RecursionError) as exc:
            raise Malformed(f"not JSON: {type(exc).__name__}") from None
    if type(value) is dict or type(value) is list:
        # Written back out, the value holds each of its strings (keys included) once; ``data``
        # holds one more for every member a repeated key shadowed. Strings counted by quotes:
        written = dump_bytes(value)
        if isinstance(data, str) and "\\" not in data:
            raw = data.count('"')
        else:
            raw = _delimiting_quotes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        if raw != _delimiting_quotes(written):
            raise Malformed("JSON whose object repeats a key")
    return value


def _delimiting_quotes(data: bytes) -> int:
    """The quotes that begin or end a string in the JSON ``data``: all but those escaped.

    A quote is escaped if an odd number of backslashes stands before it. With every pair of
    backslashes taken out (a run is paired from its start, as escapes are read), an odd run
    leaves one backslash before its quote and an even run none: two passes, however long the runs.
    """
    quotes = data.count(_QUOTE)
    if _BACKSLASH in data:
        quotes -= data.replace(b"\\\\", b"").count(b'\\"')
    return quotes


_QUOTE, _BACKSLASH = ord('"'), ord("\\")  # (bytes methods take ints at C speed)


def dumps(obj: object) -> str:
    """Compact JSON for the wire; U+2028, U+2029 and U+0085 written as escapes."""
    return dump_bytes(obj).decode()


def dump_bytes(obj: object) -> bytes:
    """:func:`dumps` as UTF-8 bytes: one line (compact JSON escapes every line break in a string)."""
    try:
        data = orjson.dumps(obj)
    except (orjson.JSONEncodeError, TypeError):  # a lone surrogate: the standard library writes it escaped
        try:
            return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()
        except RecursionError:
            raise Malformed("JSON nested too deep to write") from None
    if not data.isascii():
        for raw, escaped in _LINE_SEPARATORS:
            data = data.replace(raw, escaped)
    return data


def strings(value: object, *, skip_keys: frozenset[str] = frozenset()) -> Iterator[str]:
    """Every string in ``value``: string values, and the keys of objects not in ``skip_keys``."""
    stack = [value]
    while stack:
        node = stack.pop()
        if type(node) is str:
            yield node
        elif type(node) is dict:
            for key, child in node.items():
                if key not in skip_keys:
                    yield key
                if type(child) is str:
                    yield child
                elif type(child) in (dict, list):
                    stack.append(child)
        elif type(node) is list:
            stack.extend(node)


Path = tuple[str | int, ...]


def get_path(obj: object, path: Path) -> object:
    """The value at ``path`` in ``obj`` (None where the path does not lead anywhere)."""
    node = obj
    for key in path:
        if isinstance(key, int) and type(node) is list and 0 <= key < len(node):
            node = node[key]
        elif isinstance(key, str) and type(node) is dict:
            node = node.get(key)
        else:
            return None
    return node


DROP = object()  # as a replacement value: remove the key (or list item) at the path


def replace_paths(obj: Any, replacements: Mapping[Path, object]) -> Any:
    """A copy of ``obj`` with each path's value replaced; copies only along the paths that change."""
    if not replacements:
        return obj
    groups: dict[str | int, dict[Path, object]] = {}
    for path, value in replacements.items():
        if not path:
            return value
        groups.setdefault(path[0], {})[path[1:]] = value
    if type(obj) is dict:
        out = dict(obj)
        for key, rest in groups.items():
            if key not in out:
                continue
            new = replace_paths(out[key], rest)
            if new is DROP:
                del out[key]
            else:
                out[key] = new
        return out
    if type(obj) is list:
        items = list(obj)
        for key, rest in groups.items():
            if isinstance(key, int) and 0 <= key < len(items):
                items[key] = replace_paths(items[key], rest)
        return [item for item in items if item is not DROP]
    return obj
