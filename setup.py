"""The build: pure Python by default; ``GUARDRAIL_COMPILE=1`` also compiles the core with mypyc.

The compiled build is the same source, compiled to C extension modules that sit beside the
``.py`` files (Python imports them instead). It needs mypy and a C compiler at build time:

    pip install mypy setuptools
    GUARDRAIL_COMPILE=1 pip install --no-build-isolation .

``make compiled`` builds it in place in a copy of the tree (``build/compiled``), which
``make test`` runs the whole suite against and ``make bench`` measures beside the pure build.
Everything else lives in pyproject.toml.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent

# Every module on the per-delta path: the engine, framing, dialects and built-in rules. Not
# guardrail/core/rule.py: its runtime-checkable protocols, which plugins are checked against,
# must stay Python classes.
COMPILED = sorted(
    path.relative_to(HERE).as_posix()
    for pattern in ("guardrail/core/**/*.py", "guardrail/rules/*.py")
    for path in HERE.glob(pattern)
    if path.relative_to(HERE).as_posix() != "guardrail/core/rule.py"
)


def ext_modules() -> list[object]:
    if os.environ.get("GUARDRAIL_COMPILE", "") != "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            "GUARDRAIL_COMPILE=1 needs mypy (which ships mypyc) where the build runs: "
            "pip install mypy setuptools, then build with --no-build-isolation"
        ) from exc
    os.chdir(HERE)  # mypycify takes paths relative to the working directory
    # One C file per module, so that `build_ext -j` compiles them in parallel.
    return list(mypycify(COMPILED, opt_level="3", multi_file=True))


if __name__ == "__main__":  # as the build runs it (tests import COMPILED)
    setup(ext_modules=ext_modules())
