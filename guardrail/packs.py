"""The rule packs that ship with guardrail: ``rules/*.yaml``, for ``guardrail serve`` and for copying.

The top-level ``rules/`` directory of the source is their one source. A built wheel carries a
copy of it as ``guardrail/rule_packs/`` (package data mapped from ``rules/`` in pyproject.toml);
a source checkout, installed in place or not, reads ``rules/`` itself.
"""

from __future__ import annotations

from pathlib import Path

# The name under which the project is published: `guardrail` on PyPI is an unrelated project.
# The import package and the command stay `guardrail`.
DISTRIBUTION = "guardrail-stream"

# The pack `guardrail serve` uses when no --rules is given.
DEFAULT_PACK = "default"

_PACKAGE = Path(__file__).resolve().parent


def pack_directory() -> Path:
    """The directory holding the rule packs: the wheel's copy, or ``rules/`` in a source checkout."""
    installed = _PACKAGE / "rule_packs"
    return installed if installed.is_dir() else _PACKAGE.parent / "rules"


def packs() -> dict[str, Path]:
    """Every rule pack by name (its file name without ``.yaml``), sorted by name."""
    return {path.stem: path for path in sorted(pack_directory().glob("*.yaml"))}


def pack_path(name: str) -> Path:
    """The file of the rule pack ``name``.

    Args:
        name: a pack name, as :func:`packs` lists them (``default``, ``secrets``).

    Returns:
        The path of the pack's YAML file.

    Raises:
        KeyError: there is no such pack; the message lists the packs there are.
    """
    found = packs()
    if name not in found:
        raise KeyError(f"no rule pack named {name!r}; the packs are: {', '.join(found) or '(none)'}")
    return found[name]


def summary(path: Path) -> str:
    """The first line of a pack's opening comment, without the ``#``: what the pack is for."""
    with path.open(encoding="utf-8") as file:
        first = file.readline()
    return first.removeprefix("#").strip() if first.startswith("#") else ""
