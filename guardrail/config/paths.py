"""How problems name places and values in a rule file: ``rules[2].patterns[0]``; found ``'abrt'``."""

from __future__ import annotations

import json
import re

# A key path: mapping keys and sequence indexes from the top of the file.
KeyPath = tuple[object, ...]

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def format_path(path: KeyPath) -> str:
    """``("rules", 2, "patterns", 0)`` as ``rules[2].patterns[0]``; odd keys are quoted: ``fallbacks["a b"]``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out.append(f"[{part}]")
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{json.dumps(part if isinstance(part, str) else str(part), ensure_ascii=False)}]")
    return "".join(out)


def found(value: object) -> str:
    """A short description of a value found in the file, for messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
