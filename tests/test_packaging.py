"""What a user gets from ``pip install``: the distribution's name and license, the rule packs it ships,
and ``guardrail serve`` working from a built wheel outside the clone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardrail.cli import main
from guardrail.packs import DISTRIBUTION, pack_directory, pack_path, packs
from guardrail.proxy.demo import FAKE_API_KEY
from tests.apps import sdk_chat
from tests.servers import serve_command

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RULE_FILES = sorted((ROOT / "rules").glob("*.yaml"))
# What the build reads: everything else in the clone stays out of the copy the wheel is built from.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "guardrail", "rules")
TIMEOUT = 30.0


def test_the_license_file_is_the_apache_license_pyproject_names() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_distribution_is_named_apart_from_the_import_package_and_command() -> None:
    assert PYPROJECT["project"]["name"] == DISTRIBUTION == "guardrail-stream"
    assert PYPROJECT["project"]["scripts"] == {"guardrail": "guardrail.cli:main"}
    assert metadata.version(DISTRIBUTION) == PYPROJECT["project"]["version"]
    result = CliRunner().invoke(main, ["--version"])
    assert result.output == f"guardrail, version {PYPROJECT['project']['version']}\n"
    install = (ROOT / "README.md").read_text(encoding="utf-8").split("## Install", 1)[1].split("\n## ", 1)[0]
    assert DISTRIBUTION in install


def test_every_package_of_the_tree_is_listed_for_the_build() -> None:
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "guardrail").rglob("__init__.py")}
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert set(setuptools["packages"]) == found | {"guardrail.rule_packs"}
    assert setuptools["package-dir"] == {"guardrail.rule_packs": "rules"}


def test_the_rule_packs_are_the_files_in_rules() -> None:
    assert pack_directory() == ROOT / "rules"  # in a clone, rules/ is read itself
    assert packs() == {path.stem: path for path in RULE_FILES}
    assert pack_path("default") == ROOT / "rules" / "default.yaml"
    with pytest.raises(KeyError, match="the packs are: default, secrets"):
        pack_path("nope")


def test_rules_list_and_show_print_the_packs_for_copying() -> None:
    runner = CliRunner()
    listed = runner.invoke(main, ["rules", "list"])
    assert listed.exit_code == 0
    lines = listed.output.splitlines()
    assert [line.split()[0] for line in lines[::2]] == ["default", "secrets"]
    assert lines[0].split(None, 1)[1] == "guardrail starter rule file: a sensible set to deploy, then tune."
    assert lines[1].strip() == str(ROOT / "rules" / "default.yaml")
    for path in RULE_FILES:
        shown = runner.invoke(main, ["rules", "show", path.stem])
        assert shown.exit_code == 0 and shown.output == path.read_text(encoding="utf-8")
    missing = runner.invoke(main, ["rules", "show", "nope"])
    assert missing.exit_code == 2 and "no rule pack named 'nope'; the packs are: default, secrets" in missing.output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from a copy of the clone's build inputs, offline."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "--wheel-dir", str(dist), str(source)], check=True, timeout=120)
    (built,) = dist.glob("*.whl")
    return built


def test_the_wheel_carries_the_rule_packs_byte_for_byte_and_the_license(wheel: Path) -> None:
    assert wheel.name.startswith("guardrail_stream-")
    with zipfile.ZipFile(wheel) as archive:
        for path in RULE_FILES:
            assert archive.read(f"guardrail/rule_packs/{path.name}") == path.read_bytes()
        names = archive.namelist()
        license_file = next(name for name in names if name.endswith(".dist-info/licenses/LICENSE"))
        assert archive.read(license_file) == (ROOT / "LICENSE").read_bytes()
    assert not [name for name in names if name.startswith("rules/")]  # inside the package only


def test_guardrail_serve_from_the_installed_wheel_uses_the_packaged_default_rules(wheel: Path, tmp_path: Path) -> None:
    """``pip install`` the wheel, then ``guardrail serve`` with no arguments, far from the clone.

    The new environment gets its dependencies from this one's site-packages (a ``.pth`` line),
    so the test needs no package index; guardrail itself comes only from the wheel.
    """
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=60)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index"]
    subprocess.run([*install, str(wheel)], check=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    with serve_command([str(env_dir / "bin" / "guardrail"), "serve", "--port", "0"], cwd=elsewhere, env=environ) as (
        base_url,
        log,
    ):
        text, reasons, _ = sdk_chat(base_url, "Show me an API key", model="guardrail-demo", timeout=TIMEOUT)
    first = log.lines[0]
    assert "guarding the built-in demo model with the packaged default rules (" in first
    assert f"{purelib}/guardrail/rule_packs/default.yaml; no --rules was given" in first
    assert FAKE_API_KEY not in text and "[redacted]" in text and reasons == ["stop"]
