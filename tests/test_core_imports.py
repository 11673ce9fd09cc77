"""The core knows no provider: only a provider's own dialect module imports that provider's names."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "guardrail" / "core"
DIALECT_MODULES = {
    "guardrail.core.dialects.openai_chat",
    "guardrail.core.dialects.openai_completions",
    "guardrail.core.dialects.openai_responses",
    "guardrail.core.dialects.anthropic",
    "guardrail.core.dialects._openai",
}
# Words that name a provider's wire format: none may appear in an import outside its dialect module.
PROVIDER_WORDS = ("openai", "anthropic", "ollama", "gemini", "vercel")


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)  # from package import module
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def module_name(path: Path) -> str:
    relative = path.relative_to(CORE.parent.parent).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


def test_core_modules_import_no_provider_module() -> None:
    offenders = []
    for path in CORE.rglob("*.py"):
        name = module_name(path)
        if name in DIALECT_MODULES or name == "guardrail.core.dialects":
            continue  # a dialect module, or the registry that names them (it imports them lazily)
        for imported in imports(path):
            if any(word in imported for word in PROVIDER_WORDS):
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_the_engine_names_no_provider() -> None:
    source = (CORE / "engine.py").read_text().lower()
    for word in ("content_filter", "[done]", "chatcmpl", "choices", "finish_reason", "include_usage"):
        assert word not in source, word


def test_a_dialect_module_imports_no_other_provider() -> None:
    for path in (CORE / "dialects").glob("*.py"):
        name = module_name(path)
        if path.stem == "__init__":
            continue  # the registry
        provider = next((word for word in PROVIDER_WORDS if word in path.stem), None)
        for imported in imports(path):
            for word in PROVIDER_WORDS:
                if word in imported and word != provider:
                    raise AssertionError(f"{name} imports {imported}")
