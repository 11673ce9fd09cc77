"""Rule files: schema version 1, located errors (all at once), and the compiled RuleSet."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from guardrail.config import RuleGroup, RuleSet, check_files, load_rules
from guardrail.config.schema import BUILTIN_TYPES, RULE_NAME_RULE, json_schema
from guardrail.core.rule import Action, BoundRule, Fallback, Hit, Rule, TimedRule
from guardrail.exceptions import ConfigError, ConfigProblem
from guardrail.rules.banned import BannedPatterns

BUILTINS = ", ".join(BUILTIN_TYPES)

DATA = Path(__file__).parent / "data" / "rules"

HEADER = "version: 1\nrules:\n"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Problems name files as given: run in a temporary directory so that names are short."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(text: str, name: str = "r.yaml") -> str:
    Path(name).write_text(textwrap.dedent(text), encoding="utf-8")
    return name


def problems(text: str, name: str = "r.yaml") -> list[str]:
    return [str(problem) for problem in check_files([write(text, name)])]


def hits(rule: Rule | TimedRule, text: str) -> list[str]:
    assert isinstance(rule, Rule)
    checker = rule.checker()
    found: list[Hit] = [*checker.feed(text).hits, *checker.finish().hits]
    return [text[hit.start : hit.end] for hit in found]


# --- valid files ---------------------------------------------------------------------------


def test_valid_file_compiles_every_key() -> None:
    ruleset = load_rules(DATA / "valid.yaml")

    (group,) = ruleset.groups
    assert group.source == str(DATA / "valid.yaml")
    assert group.paths == ("/v1/*", "/chat")
    assert group.tokenizer == "cl100k_base"
    keys, names, shadow = group.rules
    assert (keys.name, keys.action, keys.holdback, keys.replacement) == (
        "api-keys",
        Action.REDACT,
        True,
        "[key removed]",
    )
    assert keys.fallback is None
    assert isinstance(keys.rule, BannedPatterns)
    assert keys.source == group.source
    assert (names.name, names.action) == ("code-names", Action.FALLBACK)
    assert names.fallback == Fallback("sorry", text="I can't help with that.")
    assert (shadow.action, shadow.holdback, shadow.replacement) == (Action.LOG, False, "[redacted]")
    assert hits(keys.rule, "key: sk-abcdefghijklmnopqrstuvwxyz0123 ok") == ["sk-abcdefghijklmnopqrstuvwxyz0123"]
    assert hits(names.rule, "About PROJECT  Starlight.") == ["PROJECT  Starlight"]


def test_defaults() -> None:
    path = write(HEADER + "  - {name: a, type: banned_patterns, phrases: [x], action: log}\n")

    (group,) = load_rules(path).groups

    assert (group.paths, group.tokenizer) == ((), "o200k_base")
    (rule,) = group.rules
    assert (rule.holdback, rule.replacement, rule.fallback) == (True, "[redacted]", None)
    assert group.matches("/anything/at/all")


def test_load_rules_takes_a_path_a_list_or_a_ruleset() -> None:
    one = write(HEADER + "  - {name: a, type: banned_patterns, phrases: [x], action: log}\n", "one.yaml")
    two = write(HEADER + "  - {name: b, type: banned_patterns, phrases: [y], action: log}\n", "two.yaml")

    assert [rule.name for rule in load_rules(one).rules] == ["a"]
    assert [rule.name for rule in load_rules(Path(one)).rules] == ["a"]
    both = load_rules([one, Path(two)])
    assert [group.source for group in both.groups] == ["one.yaml", "two.yaml"]
    assert [rule.name for rule in both.rules] == ["a", "b"]
    assert load_rules(both) is both


@pytest.mark.parametrize(
    ("globs", "path", "expected"),
    [
        ((), "/anything", True),
        (("/v1/*",), "/v1/chat/completions", True),
        (("/v1/*",), "/v1/", True),
        (("/v1/*",), "/v2/chat/completions", False),
        (("/v1/*",), "/V1/chat", False),
        (("/v1/chat/completions",), "/v1/chat/completions", True),
        (("/v1/chat/completions",), "/v1/chat/completions/x", False),
        (("/a", "/b/*"), "/b/c", True),
        (("*/completions",), "/v1/chat/completions", True),
        (("/v?/chat",), "/v2/chat", True),
    ],
)
def test_rule_group_matches_path_globs(globs: tuple[str, ...], path: str, expected: bool) -> None:
    assert RuleGroup("f.yaml", globs, "o200k_base", ()).matches(path) is expected


def test_rules_for_takes_the_rules_of_every_matching_group() -> None:
    chat = write(
        'version: 1\npaths: ["/v1/chat/*"]\nrules:\n  - {name: a, type: banned_patterns, phrases: [x], action: log}\n',
        "chat.yaml",
    )
    every = write(HEADER + "  - {name: b, type: banned_patterns, phrases: [y], action: log}\n", "every.yaml")

    ruleset = load_rules([chat, every])

    assert [rule.name for rule in ruleset.rules_for("/v1/chat/completions")] == ["a", "b"]
    assert [rule.name for rule in ruleset.rules_for("/v1/embeddings")] == ["b"]


def test_from_rules_builds_one_group_in_code() -> None:
    rule = BannedPatterns(phrases=["x"])
    ruleset = RuleSet.from_rules([BoundRule("a", rule, Action.ABORT)], paths=["/v1/*"], tokenizer="cl100k_base")

    (group,) = ruleset.groups
    assert (group.paths, group.tokenizer, [r.name for r in group.rules]) == (("/v1/*",), "cl100k_base", ["a"])
    assert ruleset.rules_for("/v2/x") == ()
    with pytest.raises(ValueError, match="duplicate rule name 'a'"):
        RuleSet.from_rules([BoundRule("a", rule, Action.LOG), BoundRule("a", rule, Action.LOG)])
    with pytest.raises(ValueError, match="no fallback"):
        RuleSet.from_rules([BoundRule("a", rule, Action.FALLBACK)])


def test_anchors_and_merge_keys_work_as_in_safe_load() -> None:
    path = write(
        """\
        version: 1
        rules:
          - &base {name: a, type: banned_patterns, phrases: [x], action: redact, replacement: "*"}
          - <<: *base
            name: b
            action: log
        """
    )

    a, b = load_rules(path).rules

    assert (a.name, a.action, a.replacement) == ("a", Action.REDACT, "*")
    assert (b.name, b.action, b.replacement) == ("b", Action.LOG, "*")


# --- problems: all of them, each with file, line and key path ---------------------------------


def test_acceptance_bad_regex_unknown_key_and_unknown_fallback_all_reported() -> None:
    bad = str(DATA / "bad.yaml")

    assert [str(problem) for problem in check_files([bad])] == [
        f"{bad}:8: rules[0].patterns[1]: invalid regex 'sk-[A-Za-z0-9': unterminated character set at position 13",
        f"{bad}:14: rules[1].replacment: unknown key 'replacment'; did you mean 'replacement'?",
        f"{bad}:19: rules[2].fallback: unknown fallback 'try-agian'; defined fallbacks: try-again",
    ]


def test_load_rules_raises_config_error_with_every_problem_of_every_file() -> None:
    one = write(HEADER + "  - {name: a, type: banned_patterns, patterns: ['('], action: log}\n", "one.yaml")
    two = write(HEADER + "  - {name: a, type: banned_patterns, phrases: [x], action: nope}\n", "two.yaml")

    with pytest.raises(ConfigError) as raised:
        load_rules([one, two])

    assert [str(problem) for problem in raised.value.problems] == [
        "one.yaml:3: rules[0].patterns[0]: invalid regex '(': missing ) at position 1",
        "two.yaml:3: rules[0].name: duplicate rule name 'a'; it is already used at one.yaml:3 (names must be unique)",
        "two.yaml:3: rules[0].action: expected one of 'abort', 'fallback', 'redact' or 'log'; found 'nope'",
    ]
    assert str(raised.value) == "\n".join(str(problem) for problem in raised.value.problems)
    assert raised.value.problems[0] == ConfigProblem(
        "one.yaml", 3, "rules[0].patterns[0]", "invalid regex '(': missing ) at position 1"
    )


def test_problems_are_sorted_by_file_then_line() -> None:
    text = """\
        version: 1
        rules:
          - name: b
            type: banned_patterns
            action: fallback
            fallback: missing
            phrases: [x]
            extra: 1
          - name: b
            type: banned_patterns
            patterns: ['a|']
            action: log
        fallbacks:
          f: {txt: hi}
        """
    assert problems(text) == [
        "r.yaml:6: rules[0].fallback: unknown fallback 'missing'; defined fallbacks: f",
        "r.yaml:8: rules[0].extra: unknown key 'extra'; allowed here: name, type, action, fallback, replacement, "
        "holdback, patterns, phrases, normalize",
        "r.yaml:9: rules[1].name: duplicate rule name 'b'; it is already used at line 3 (names must be unique)",
        "r.yaml:11: rules[1].patterns[0]: pattern 'a|' matches the empty string, so it would match everywhere",
        "r.yaml:14: fallbacks.f.txt: unknown key 'txt'; did you mean 'text'?",
    ]


RULE = "  - name: r\n    type: banned_patterns\n    phrases: [x]\n    action: log\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "", ["r.yaml: the file is empty; a rule file is a mapping with 'version: 1' and 'rules'"], id="empty"
        ),
        pytest.param(
            "# nothing but a comment\n",
            ["r.yaml: the file is empty; a rule file is a mapping with 'version: 1' and 'rules'"],
            id="comment-only",
        ),
        pytest.param(
            "- version: 1\n",
            ["r.yaml:1: a rule file is a mapping with 'version: 1' and 'rules'; found a list"],
            id="list",
        ),
        pytest.param(
            "version: 1\nrules: [\n  {name: a}\nfoo: 1\n",
            [
                "r.yaml:4: invalid YAML: while parsing a flow sequence, expected ',' or ']', "
                "but got '<scalar>' (column 1)"
            ],
            id="syntax",
        ),
        pytest.param(
            "version: 1\nrules: []\n---\nversion: 1\n",
            ["r.yaml:3: invalid YAML: expected a single document in the stream, but found another document (column 1)"],
            id="two-documents",
        ),
        pytest.param(
            "version: 1\nrules: []\nrules: []\n",
            ["r.yaml:3: rules: duplicate key 'rules'; the first is at line 2"],
            id="dup-key",
        ),
        pytest.param(
            "version: 1\nrules: []\nwhen: 2024-13-45\n",
            ["r.yaml:3: invalid YAML: cannot read '2024-13-45': month must be in 1..12 (column 7)"],
            id="bad-timestamp",
        ),
        pytest.param(
            "version: 1\nrules: !!python/object/apply:os.system ['true']\n",
            [
                "r.yaml:2: invalid YAML: could not determine a constructor for the tag "
                "'tag:yaml.org,2002:python/object/apply:os.system' (column 8)"
            ],
            id="unsafe-tag",
        ),
        pytest.param("rules: []\n", ["r.yaml:1: missing required key 'version'"], id="no-version"),
        pytest.param(
            "version: 2\nrules: []\n",
            ["r.yaml:1: version: unsupported version 2; this guardrail reads rule files with 'version: 1'"],
            id="version-2",
        ),
        pytest.param(
            "version: '1'\nrules: []\n",
            ["r.yaml:1: version: unsupported version '1'; this guardrail reads rule files with 'version: 1'"],
            id="version-string",
        ),
        pytest.param("version: 1\n", ["r.yaml:1: missing required key 'rules'"], id="no-rules"),
        pytest.param(
            "version: 1\nrule: []\n",
            ["r.yaml:1: missing required key 'rules'", "r.yaml:2: rule: unknown key 'rule'; did you mean 'rules'?"],
            id="typo-top-level",
        ),
        pytest.param(
            "version: 1\npaths: ['v1/*']\nrules: []\n",
            ["r.yaml:2: paths[0]: a path glob starts with '/' or '*' (request paths do); found 'v1/*'"],
            id="relative-glob",
        ),
        pytest.param(
            "version: 1\npaths: /v1/*\nrules: []\n", ["r.yaml:2: paths: expected a list; found '/v1/*'"], id="paths-str"
        ),
        pytest.param(
            "version: 1\ntokenizer: ''\nrules: []\n", ["r.yaml:2: tokenizer: cannot be empty"], id="empty-tokenizer"
        ),
        pytest.param(
            HEADER + "  - just a string\n",
            ["r.yaml:3: rules[0]: a rule is a mapping with 'name', 'type' and 'action'; found 'just a string'"],
            id="rule-not-mapping",
        ),
        pytest.param(
            HEADER + "  - name: API Keys\n    type: banned_patterns\n    phrases: [x]\n    action: log\n",
            [f"r.yaml:3: rules[0].name: {RULE_NAME_RULE}; found 'API Keys'"],
            id="bad-name",
        ),
        pytest.param(
            HEADER + "  - type: banned_patterns\n    phrases: [x]\n    action: log\n",
            ["r.yaml:3: rules[0]: missing required key 'name'"],
            id="no-name",
        ),
        pytest.param(
            HEADER + "  - name: r\n    phrases: [x]\n    action: log\n",
            [
                f"r.yaml:3: rules[0]: missing required key 'type' (built-in: {BUILTINS}; "
                "or a plugin 'package.module:Class')"
            ],
            id="no-type",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: [banned_patterns]\n    action: log\n",
            ["r.yaml:4: rules[0].type: expected a string; found a list"],
            id="type-not-str",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: banned_patterns\n    phrases: [x]\n",
            ["r.yaml:3: rules[0]: missing required key 'action'"],
            id="no-action",
        ),
        pytest.param(
            HEADER + RULE + "    holdback: 'no'\n",
            ["r.yaml:7: rules[0].holdback: expected true or false; found 'no'"],
            id="holdback-str",
        ),
        pytest.param(
            HEADER + RULE + "    replacement: 3\n",
            ["r.yaml:7: rules[0].replacement: expected a string; found 3"],
            id="replacement-int",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: banned_patterns\n    action: log\n",
            ["r.yaml:3: rules[0]: banned_patterns needs at least one of 'patterns' or 'phrases'"],
            id="nothing-banned",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: banned_patterns\n    patterns: 'sk-.*'\n    action: log\n",
            ["r.yaml:5: rules[0].patterns: expected a list; found 'sk-.*'"],
            id="patterns-str",
        ),
        pytest.param(
            HEADER
            + "  - name: r\n    type: banned_patterns\n    patterns:\n      - ok\n      - 'x*'\n    action: log\n",
            ["r.yaml:7: rules[0].patterns[1]: pattern 'x*' matches the empty string, so it would match everywhere"],
            id="empty-match",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: banned_patterns\n    phrases: [ok, '  ', 3]\n    action: log\n",
            [
                "r.yaml:5: rules[0].phrases[1]: a phrase cannot be empty",
                "r.yaml:5: rules[0].phrases[2]: expected a string; found 3",
            ],
            id="bad-phrases",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: banned_patterns\n    phrases: [x]\n    action: fallback\n",
            [
                "r.yaml:3: rules[0]: action 'fallback' needs a 'fallback' key naming the answer to give; "
                "the file has no 'fallbacks' section"
            ],
            id="fallback-missing",
        ),
        pytest.param(
            HEADER + RULE + "    fallback: f\nfallbacks:\n  f: {text: hi}\n",
            ["r.yaml:7: rules[0].fallback: 'fallback' only applies to action 'fallback'; this rule's action is 'log'"],
            id="fallback-on-log",
        ),
        pytest.param(
            "version: 1\nrules: []\nfallbacks:\n  a: {text: x, url: 'http://h/'}\n  b: {url: 'ftp://h/'}\n"
            "  c: {text: x, model: m}\n  d: {text: ''}\n  e: nope\n",
            [
                "r.yaml:4: fallbacks.a: a fallback has exactly one of 'text' (a fixed answer) "
                "or 'url' (another upstream)",
                "r.yaml:5: fallbacks.b.url: expected an http:// or https:// URL; found 'ftp://h/'",
                "r.yaml:6: fallbacks.c: 'model' only applies to a fallback with 'url'",
                "r.yaml:7: fallbacks.d.text: cannot be empty",
                "r.yaml:8: fallbacks.e: expected a mapping; found 'nope'",
            ],
            id="bad-fallbacks",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: no_such_rule\n    action: log\n",
            [
                f"r.yaml:4: rules[0].type: unknown rule type 'no_such_rule'; built-in types: {BUILTINS}; "
                "installed plugins: none"
            ],
            id="unknown-type",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: banned_patterns\n    phrases: [x]\n    action: log\n    options: {}\n",
            [
                "r.yaml:7: rules[0].options: unknown key 'options'; allowed here: name, type, action, fallback, "
                "replacement, holdback, patterns, phrases, normalize"
            ],
            id="options-on-builtin",
        ),
        pytest.param(
            HEADER + "  - name: r\n    type: json:nope\n    action: log\n    phrases: [x]\n",
            [
                "r.yaml:4: rules[0].type: plugin 'json:nope': module 'json' has no attribute 'nope'",
                "r.yaml:6: rules[0].phrases: unknown key 'phrases'; allowed here: name, type, action, fallback, "
                "replacement, holdback, options",
            ],
            id="builtin-key-on-plugin",
        ),
    ],
)
def test_problem(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_unreadable_and_non_utf8_files() -> None:
    Path("latin1.yaml").write_bytes(b"version: 1\n# caf\xe9\nrules: []\n")

    assert [str(p) for p in check_files(["missing.yaml", "latin1.yaml"])] == [
        "missing.yaml: cannot read the file: No such file or directory",
        "latin1.yaml:2: not valid UTF-8 (byte 16): rule files are UTF-8 text",
    ]


def test_a_utf8_bom_is_accepted() -> None:
    Path("bom.yaml").write_bytes(b"\xef\xbb\xbf" + (HEADER + RULE).encode())

    assert check_files(["bom.yaml"]) == []


def test_rule_names_must_be_unique_across_files() -> None:
    one = write(HEADER + RULE, "one.yaml")
    two = write("version: 1\n\nrules:\n" + RULE, "two.yaml")

    assert [str(p) for p in check_files([one, two])] == [
        "two.yaml:4: rules[0].name: duplicate rule name 'r'; it is already used at one.yaml:3 (names must be unique)"
    ]


def test_alias_expansion_stays_linear() -> None:
    # A "billion laughs" file: 9 levels of 9 aliases would be 9**9 items if copied.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    write("\n".join(levels) + "\nversion: 1\nrules: *a9\n")

    found = [str(problem) for problem in check_files(["r.yaml"])]

    # Ten unknown keys (a0..a9) and nine rules that are lists, no more: nothing was expanded.
    assert len(found) == 19
    assert found[-1] == "r.yaml:12: rules[8]: a rule is a mapping with 'name', 'type' and 'action'; found a list"


def test_plugin_failures_are_located_and_name_the_plugin(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (in_tmp / "myplugins.py").write_text(
        textwrap.dedent(
            """\
            class NotARule:
                def __init__(self, **options):
                    pass

            class Strict:
                def __init__(self, *, level: int) -> None:
                    if level > 3:
                        raise ValueError("level goes up to 3")

                def checker(self):
                    raise NotImplementedError

            NOT_CALLABLE = 3
            """
        )
    )
    (in_tmp / "broken_plugin.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(in_tmp))
    text = HEADER + "".join(
        f"  - name: p{i}\n    type: {kind}\n    action: log\n    options: {options}\n"
        for i, (kind, options) in enumerate(
            [
                ("myplugins:Strict", "{level: 2}"),
                ("myplugins:Strict", "{level: 4}"),
                ("myplugins:Strict", "{}"),
                ("myplugins:NotARule", "{}"),
                ("myplugins:NOT_CALLABLE", "{}"),
                ("myplugins:Missing", "{}"),
                ("no_such_package.sub:Rule", "{}"),
                ("broken_plugin:Rule", "{}"),
            ]
        )
    )

    assert problems(text) == [
        "r.yaml:10: rules[1].options: plugin 'myplugins:Strict' rejected its options: ValueError: level goes up to 3",
        "r.yaml:14: rules[2].options: plugin 'myplugins:Strict' rejected its options: TypeError: "
        "Strict.__init__() missing 1 required keyword-only argument: 'level'",
        "r.yaml:16: rules[3].type: plugin 'myplugins:NotARule' gave an instance of NotARule, which is not a rule: "
        "it has no checker() method",
        "r.yaml:20: rules[4].type: plugin 'myplugins:NOT_CALLABLE' is an instance of int, not a class",
        "r.yaml:24: rules[5].type: plugin 'myplugins:Missing': module 'myplugins' has no attribute 'Missing'",
        "r.yaml:28: rules[6].type: plugin 'no_such_package.sub:Rule': no module named 'no_such_package' "
        "(is it installed, or on PYTHONPATH?)",
        "r.yaml:32: rules[7].type: plugin 'broken_plugin:Rule': importing 'broken_plugin' failed: "
        "ModuleNotFoundError: No module named 'does_not_exist_anywhere'",
    ]


def test_plugins_are_found_by_entry_point_name(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (in_tmp / "ep_plugin.py").write_text(
        "class Shouty:\n    def __init__(self, *, word: str) -> None:\n        self.word = word\n"
        "    def checker(self):\n        raise NotImplementedError\n"
    )
    dist = in_tmp / "ep_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[guardrail.rules]\nshouty = ep_plugin:Shouty\n")
    monkeypatch.syspath_prepend(str(in_tmp))

    (rule,) = load_rules(write(HEADER + "  - {name: s, type: shouty, action: log, options: {word: HEY}}\n")).rules
    assert type(rule.rule).__name__ == "Shouty"
    assert problems(HEADER + "  - {name: s, type: shout, action: log}\n") == [
        f"r.yaml:3: rules[0].type: unknown rule type 'shout'; built-in types: {BUILTINS}; installed plugins: shouty"
    ]


def test_json_schema_describes_the_closed_schema() -> None:
    schema = json_schema()

    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {
        "version",
        "tokenizer",
        "paths",
        "rules",
        "fallbacks",
        "dialects",
        "pass_unreadable",
        "final_answer_only",
        "allow_empty",
    }
    assert schema["required"] == ["version", "rules"]
    variants = schema["properties"]["rules"]["items"]["oneOf"]
    titles = {schema["$defs"][v["$ref"].rsplit("/", 1)[1]]["title"] for v in variants}
    assert titles == {entry.spec.__name__ for entry in BUILTIN_TYPES.values()} | {"PluginRuleSpec"}
    banned = schema["$defs"]["BannedPatternsSpec"]
    assert banned["additionalProperties"] is False
    assert banned["properties"]["name"]["pattern"] == "^[a-z0-9][a-z0-9_.-]{0,63}$"
    assert banned["properties"]["action"]["enum"] == ["abort", "fallback", "redact", "log"]
    assert schema["$defs"]["PluginRuleSpec"]["properties"]["type"]["not"] == {"enum": list(BUILTIN_TYPES)}


def test_a_text_fallback_takes_a_separator_and_a_url_fallback_does_not() -> None:
    base = """\
        version: 1
        rules:
          - {name: names, type: banned_patterns, phrases: [project starlight], action: fallback, fallback: sorry}
        fallbacks:
          sorry: %s
        """
    glued = load_rules(write(base % '{text: "Sorry.", separator: ""}'))
    assert glued.rules[0].fallback == Fallback("sorry", text="Sorry.", separator="")
    assert load_rules(write(base % '{text: "Sorry."}')).rules[0].fallback == Fallback("sorry", text="Sorry.")
    found = problems(base % '{url: "http://127.0.0.1:9/v1", separator: ""}')
    assert len(found) == 1 and "'separator' only applies to a fallback with 'text'" in found[0]
