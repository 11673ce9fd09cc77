"""The compiled build (setup.py, ``make compiled``): what it compiles, and which build a test run tests.

``make test`` runs the whole suite twice: against the source, then against the compiled build in
``build/compiled`` with ``GUARDRAIL_EXPECT_COMPILED=1``; each run checks that it imports the
build it means to, so that a run cannot pass by testing the other one.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECT_COMPILED = os.environ.get("GUARDRAIL_EXPECT_COMPILED") == "1"


def compiled_modules() -> list[str]:
    listed: list[str] = runpy.run_path(str(ROOT / "setup.py"))["COMPILED"]
    return [path.removesuffix(".py").replace("/", ".").removesuffix(".__init__") for path in listed]


def is_extension(module_name: str) -> bool:
    module_file = importlib.import_module(module_name).__file__ or ""
    return module_file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_build_compiles_every_module_of_the_per_delta_path() -> None:
    listed = compiled_modules()
    for name in ("guardrail.core.engine", "guardrail.core.sse", "guardrail.core.framing", "guardrail.rules.banned"):
        assert name in listed
    for path in (ROOT / "guardrail" / "core" / "dialects").glob("*.py"):
        assert f"guardrail.core.dialects.{path.stem}".removesuffix(".__init__") in listed
    # Plugins are checked against these protocols at runtime: they stay Python classes.
    assert "guardrail.core.rule" not in listed
    assert not any(name.startswith(("guardrail.asgi", "guardrail.proxy", "guardrail.config")) for name in listed)


@pytest.mark.parametrize("module_name", compiled_modules())
def test_this_run_imports_the_build_it_means_to(module_name: str) -> None:
    assert is_extension(module_name) == EXPECT_COMPILED, (
        f"{module_name} is {'not ' if EXPECT_COMPILED else ''}compiled in a run that expects "
        f"the {'compiled' if EXPECT_COMPILED else 'source'} build"
    )


def test_the_rule_protocols_stay_python_classes_in_either_build() -> None:
    assert not is_extension("guardrail.core.rule")
    from guardrail.core.rule import Rule
    from guardrail.rules.banned import BannedPatterns

    assert isinstance(BannedPatterns(patterns=["sk-[a-z]{8}"]), Rule)
