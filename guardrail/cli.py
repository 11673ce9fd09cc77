"""The ``guardrail`` command.

Every subcommand is a click command registered on :func:`main`: decorate it with
``@main.command()`` here, or define it elsewhere and ``main.add_command(it)``. Heavy imports
(the server, the proxy) belong inside the command functions, so ``guardrail --help`` and
``guardrail check`` stay fast.
"""

from __future__ import annotations

import json

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="guardrail", prog_name="guardrail")
def main() -> None:
    """Guard streaming LLM answers in flight: banned patterns, token budgets, timeouts."""


@main.command()
@click.argument("files", nargs=-1, metavar="FILE...", type=click.Path(dir_okay=False, path_type=str))
@click.option("--schema", is_flag=True, help="Print the JSON Schema of rule files (for editors) and exit.")
def check(files: tuple[str, ...], schema: bool) -> None:
    """Validate rule files.

    Checks every FILE against the rule file schema (version 1): unknown keys, bad values,
    invalid regexes, unknown fallbacks, rule names used twice (across all FILEs, which are
    checked together as they would be loaded), and plugins that cannot be imported or built.

    Every problem is printed to stderr on its own line, and the command exits with status 1:

    \b
      FILE:LINE: KEY.PATH: MESSAGE
      rules.yaml:8: rules[0].patterns[1]: invalid regex 'sk-[': ...

    When all files are valid, it prints "FILE: ok (N rules)" for each and exits with status 0.

    \b
    Examples:
      guardrail check rules/default.yaml
      guardrail check rules/*.yaml
      guardrail check --schema > guardrail-rules.schema.json
    """
    # Imported here: pydantic and the rule builders are not needed for --help or other commands.
    from guardrail.config.loader import compile_files
    from guardrail.config.schema import json_schema

    if schema:
        click.echo(json.dumps(json_schema(), indent=2))
        return
    if not files:
        raise click.UsageError("give at least one rule file to check (or --schema)")
    result = compile_files(files)
    valid = {group.source: len(group.rules) for group in result.groups}
    for file in files:
        if file in valid:
            click.echo(f"{file}: ok ({_rules(valid[file])})")
    for problem in result.problems:
        click.echo(str(problem), err=True)
    if result.problems:
        count = len(result.problems)
        click.echo(f"{count} problem{'s' if count != 1 else ''} found.", err=True)
        raise SystemExit(1)


def _rules(count: int) -> str:
    return f"{count} rule" if count == 1 else f"{count} rules"
