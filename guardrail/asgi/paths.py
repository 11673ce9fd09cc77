"""Request paths as routers and upstreams resolve them, so that no spelling walks around a rule.

A rule file guards ``/v1/chat/completions``; a client may send ``/v1/./chat/completions``,
``/v1//chat/completions/``, ``/V1/chat/completions``, ``/v1/chat/completions;x=1`` or
``/v1/chat%2Fcompletions``, and many servers and upstreams answer those as the same endpoint.
:func:`canonical_path` resolves a path the way they do (dot segments, repeated and trailing
slashes, matrix parameters, surrounding spaces); it refuses (None) what cannot be resolved
safely: encoded slashes and backslashes, encoded percent signs (double encoding), NUL and other
control characters, invalid escapes, ``..`` above the root, and paths over :data:`MAX_PATH`.
:func:`path_forms` gives every spelling a path is checked under: a path is guarded when any
of them is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

MAX_PATH = 8192

_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNSAFE_ESCAPE = re.compile(r"%(?:2[fF]|5[cC]|25|00)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def canonical_path(path: str, raw_path: bytes | None = None) -> str | None:
    """``path`` resolved as a router or upstream would; None if it cannot be resolved safely.

    Args:
        path: the decoded request path (ASGI ``path``).
        raw_path: the path as the client sent it (ASGI ``raw_path``), if the server gave it.
    """
    raw = raw_path.decode("latin-1") if raw_path else path
    if len(raw) > MAX_PATH or len(path) > MAX_PATH:
        return None
    if "%" in raw:
        if _ESCAPE.search(raw) or _UNSAFE_ESCAPE.search(raw):
            return None
        decoded = unquote(raw, errors="strict") if raw_path else path
    else:
        decoded = raw if raw_path else path
    if _CONTROL.search(decoded) or _CONTROL.search(path):
        return None
    segments: list[str] = []
    for segment in decoded.split("/"):
        segment = segment.split(";", 1)[0].strip()  # matrix parameters, spaces around
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def route_path(scope: Mapping[str, Any]) -> str:
    """The path the app routes: ``path`` without ``root_path`` (an app mounted or served under a prefix)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "") or ""
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        return path[len(root.rstrip("/")) :] or "/"
    return path


def path_forms(scope: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The spellings a request path is checked under: as routed, resolved, lowercased; None if unsafe."""
    routed = route_path(scope)
    raw_path = scope.get("raw_path")
    root = scope.get("root_path", "") or ""
    if raw_path and root:
        encoded_root = root.encode("latin-1", "replace")
        if raw_path.startswith(encoded_root):
            raw_path = raw_path[len(encoded_root.rstrip(b"/")) :]
    canonical = canonical_path(routed, raw_path)
    if canonical is None:
        return None
    return tuple(dict.fromkeys((canonical, routed, canonical.lower())))
