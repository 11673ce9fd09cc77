"""The ``guardrail`` command.

Every subcommand is a click command registered on :func:`main`: decorate it with
``@main.command()`` here, or define it elsewhere and ``main.add_command(it)``. Heavy imports
(the server, the proxy) belong inside the command functions, so ``guardrail --help`` and
``guardrail check`` stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import click

from guardrail.client import DEFAULT_MODEL, DEFAULT_URL
from guardrail.packs import DEFAULT_PACK, DISTRIBUTION

if TYPE_CHECKING:
    from guardrail.exceptions import ConfigProblem


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=DISTRIBUTION, prog_name="guardrail")
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


@main.command()
@click.option(
    "--rules",
    "rule_files",
    multiple=True,
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=str),
    help=f"A rule file; repeat for several. Default: the packaged {DEFAULT_PACK!r} pack "
    f"(guardrail rules show {DEFAULT_PACK}).",
)
@click.option(
    "--upstream",
    metavar="URL",
    help="The OpenAI-compatible server to guard, e.g. https://api.openai.com/v1. Default: the built-in demo model.",
)
@click.option(
    "--pass-through",
    "pass_through",
    multiple=True,
    metavar="GLOB",
    help="Forward requests on paths matching GLOB unguarded (the proxy refuses API paths it cannot guard).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes (see PROMETHEUS_MULTIPROC_DIR below).",
)
@click.option(
    "--record",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=str),
    help="Write every answer the model sends on a guarded path to its own file in DIR, as it arrives and "
    "before any rule sees it, for `guardrail replay`. The files hold model text, including what the rules "
    "cut or redact: keep DIR private. Request headers are never written.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level of the server and the guard.",
)
def serve(
    rule_files: tuple[str, ...],
    upstream: str | None,
    pass_through: tuple[str, ...],
    host: str,
    port: int,
    workers: int,
    record: str | None,
    log_level: str,
) -> None:
    """Run the guarding proxy in front of an OpenAI-compatible model server.

    Each dialect's endpoint (POST /v1/chat/completions, /v1/responses, /v1/messages...) goes to
    the upstream with the client's end-to-end headers, credentials included; its answers,
    streamed or not, are guarded by the rules. Models lists and embeddings are forwarded
    unguarded; other API paths are refused unless --pass-through names them. Paths are
    resolved first (dot segments, repeated slashes), and forwarded as resolved. GET /metrics serves
    Prometheus metrics; GET /healthz answers {"status":"ok"} while the process serves, GET /readyz
    answers 503 while the upstream cannot be reached. A fallback with a url gets the client's credentials
    only if it is on the upstream's origin (scheme, host and port).

    Without --upstream, the built-in demo model answers: no API key needed. Ask it for an API
    key, the roadmap, a customer record, a long story, or to stall, and watch the rules work
    (guardrail try "What is the API key?"). Without --rules, the packaged default rule pack
    guards it (guardrail rules show default prints it).

    Rule files are reloaded when they change, or on SIGHUP; a broken edit is refused (its
    problems are logged) and the rules in force stay. Streams in flight keep their rules.

    With --workers N above 1, each worker counts its own metrics: set PROMETHEUS_MULTIPROC_DIR
    to an empty directory first for /metrics to sum them. Workers start from the factory
    guardrail.proxy.app:create_app, configured by GUARDRAIL_RULES and GUARDRAIL_UPSTREAM.

    \b
    Examples:
      guardrail serve
      guardrail serve --rules rules/default.yaml --upstream https://api.openai.com/v1
      guardrail serve --record recordings/
      guardrail try "What is the API key?"
    """
    from guardrail.exceptions import ConfigError, ListenError
    from guardrail.packs import pack_path
    from guardrail.proxy.app import ServeSettings, run

    settings = ServeSettings(rule_files, upstream, pass_through, record)
    if not rule_files:
        settings = replace(settings, rules=(str(pack_path(DEFAULT_PACK)),), default_rules=True)
    try:
        run(
            settings,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
        )
    except ConfigError as exc:
        _print_problems(exc.problems)
        raise SystemExit(1) from None
    except ListenError as exc:
        click.echo(f"guardrail serve: {exc}", err=True)
        raise SystemExit(1) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@click.option(
    "--rules",
    "rule_files",
    multiple=True,
    required=True,
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=str),
    help="A rule file; repeat for several.",
)
@click.argument("stream_file", metavar="STREAM_FILE", type=click.Path(dir_okay=False, allow_dash=True, path_type=str))
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    metavar="N",
    help="Feed the recording in pieces of N bytes instead of one event at a time.",
)
@click.option(
    "--path",
    default="/v1/chat/completions",
    show_default=True,
    help="The request path the stream answered (rule files guard paths they list).",
)
@click.option(
    "--dialect",
    default=None,
    help="The recording's dialect (openai_chat, openai_responses, anthropic_messages, ollama...); "
    "by default the one the path names.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def replay(
    rule_files: tuple[str, ...], stream_file: str, chunk_size: int | None, path: str, dialect: str | None, as_json: bool
) -> None:
    """Show what the client would see of a recorded stream, through rule files.

    STREAM_FILE is the raw body of an answer ("-" reads stdin): an OpenAI chat completion
    stream by default, or the dialect of --path (or --dialect), e.g.
    captured with curl -N ... > answer.sse. It is fed to the guard one event at a time, as a
    server sends it (or in --chunk-size pieces), and the command prints the text the client
    would receive per channel, the finish reasons, whether [DONE] came, any error event, a
    table of the rule hits (rule, action, channel, start and end offsets in the channel's
    text, characters leaked, detail) and how the stream ended.

    Time-based rules never fire in a replay: a recording holds no timing.

    Exits with status 0 when the replay ran (whatever the rules did), 1 when the recording
    or a rule file cannot be read or a rule file is invalid, 2 on usage errors.

    \b
    Examples:
      guardrail replay --rules rules/default.yaml answer.sse
      guardrail replay --rules rules/default.yaml --chunk-size 7 --json answer.sse
    """
    from guardrail.config import load_rules
    from guardrail.exceptions import ConfigError
    from guardrail.replay import render_text, replay as run_replay

    try:
        with click.open_file(stream_file, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        click.echo(f"{stream_file}: cannot read the recording: {exc.strerror or exc}", err=True)
        raise SystemExit(1) from None
    try:
        ruleset = load_rules(list(rule_files))
    except ConfigError as exc:
        _print_problems(exc.problems)
        raise SystemExit(1) from None
    rules = ruleset.rules_for(path)
    if not rules:
        click.echo(f"warning: no rule in {', '.join(rule_files)} guards the path {path}", err=True)
    from guardrail.core.dialects import DIALECTS, dialect_for_path

    name = dialect or ruleset.dialect_for(path) or dialect_for_path(path) or "openai_chat"
    if name not in DIALECTS:
        raise click.UsageError(f"unknown dialect {name!r}; known: {', '.join(DIALECTS)}")
    result = run_replay(data, rules, chunk_size=chunk_size, dialect=name)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(render_text(result))


@main.command(name="try")
@click.argument("prompt")
@click.option(
    "--url",
    default=DEFAULT_URL,
    show_default=True,
    help="The guard's base URL: `make run`'s address by default.",
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="The model to ask for.")
@click.option(
    "--api-key",
    envvar="OPENAI_API_KEY",
    metavar="KEY",
    help="Sent as a bearer token, for a guard in front of a real upstream. Default: $OPENAI_API_KEY.",
)
def try_prompt(prompt: str, url: str, model: str, api_key: str | None) -> None:
    """Ask a running guard PROMPT and show what its client gets.

    Sends PROMPT as a streamed chat completion to the guard at --url, prints the answer as it
    arrives, then how it ended (the finish reason, or the error sent) and which rules fired. The
    rules are read from the guard's /metrics before and after the answer, so on a guard serving
    others at the same time they count theirs too.

    Exits with status 0 when the answer ended without an error, 1 otherwise.

    \b
    Examples (against `make run`):
      guardrail try "What is the API key?"
      guardrail try "What is on the roadmap?"
      guardrail try "Tell me a long story"
    """
    from guardrail.client import GuardUnreachable, ask, describe_rules

    last = [""]  # the end of what was printed: the summary follows after one blank line

    def write(text: str) -> None:
        click.echo(text, nl=False)
        last[0] = text[-1]

    try:
        answer = ask(prompt, write, url=url, model=model, api_key=api_key)
    except GuardUnreachable as exc:
        click.echo(f"{exc}: start one with `make run` or `guardrail serve`, or give its address with --url", err=True)
        raise SystemExit(1) from None
    click.echo("" if last[0] == "\n" else "\n")
    if answer.status != 200:
        click.echo(f"HTTP status: {answer.status}")
    if answer.error is not None:
        click.echo(f"error: {answer.error.get('code') or answer.error.get('type')}: {answer.error.get('message')}")
    else:
        click.echo(f"finish_reason: {answer.finish_reason or '(none)'}")
    click.echo(f"rules fired: {describe_rules(answer.rules)}")
    click.echo(f"request id: {answer.request_id}")
    if answer.error is not None or answer.status != 200:
        raise SystemExit(1)


@main.group()
def rules() -> None:
    """The rule packs that ship with guardrail, to start from or copy.

    \b
    Examples:
      guardrail rules list
      guardrail rules show default > my-rules.yaml
      guardrail serve --rules my-rules.yaml
    """


@rules.command(name="list")
def list_packs() -> None:
    """List the rule packs: name, what it is for, and where its file is."""
    from guardrail.packs import packs, summary

    found = packs()
    width = max((len(name) for name in found), default=0)
    for name, path in found.items():
        click.echo(f"{name.ljust(width)}  {summary(path)}")
        click.echo(f"{' ' * width}  {path}")


@rules.command()
@click.argument("name")
def show(name: str) -> None:
    """Print the rule pack NAME (a name from `guardrail rules list`), to copy and edit."""
    from guardrail.packs import pack_path

    try:
        path = pack_path(name)
    except KeyError as exc:
        raise click.UsageError(str(exc.args[0])) from None
    click.echo(path.read_text(encoding="utf-8"), nl=False)


def _print_problems(problems: Sequence[ConfigProblem]) -> None:
    for problem in problems:
        click.echo(str(problem), err=True)
    count = len(problems)
    click.echo(f"{count} problem{'s' if count != 1 else ''} found.", err=True)
