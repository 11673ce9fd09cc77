"""The rule packs in rules/: what they catch, what they leave alone, and that ordinary text is not held.

Every check goes through the real checkers (``rule.checker()``, ``feed``, ``finish``), with the
text fed whole and in small chunks. Fake credentials are assembled from pieces so that secret
scanners do not flag this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guardrail.config import RuleSet, load_rules
from guardrail.core.rule import Action, BoundRule, Fallback, Hit, Rule

RULES = Path(__file__).parent.parent / "rules"
CHUNK_SIZES = [None, 1, 2, 5, 16]


def pieces(text: str, size: int | None) -> list[str]:
    return [text] if size is None else [text[i : i + size] for i in range(0, len(text), size)]


def scan(rule: BoundRule, text: str, size: int | None) -> list[str]:
    """The text of every hit of ``rule`` on ``text`` fed in chunks of ``size`` (None: whole)."""
    assert isinstance(rule.rule, Rule)
    checker = rule.rule.checker()
    hits: list[Hit] = []
    for piece in pieces(text, size):
        hits += checker.feed(piece).hits
    hits += checker.finish().hits
    return [text[hit.start : hit.end] for hit in hits]


def scan_all(ruleset: RuleSet, text: str, size: int | None) -> dict[str, list[str]]:
    found = {rule.name: scan(rule, text, size) for rule in ruleset.rules if isinstance(rule.rule, Rule)}
    return {name: matched for name, matched in found.items() if matched}


@pytest.fixture(scope="module")
def secrets() -> RuleSet:
    return load_rules(RULES / "secrets.yaml")


@pytest.fixture(scope="module")
def default() -> RuleSet:
    return load_rules(RULES / "default.yaml")


B64 = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
OPENAI_PROJECT = "sk-" + "proj-" + "T3BlbkFJ" + "aB3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gH"  # the demo model's form: 40 alnum
OPENAI_PROJECT_LONG = "sk-" + "proj-" + ("Ab9_Cd8-Ef7" * 14)
OPENAI_SVCACCT = "sk-" + "svcacct-" + B64 + "_-" + B64
OPENAI_LEGACY = "sk-" + B64 + "ZyXwVuTsRqPo"
ANTHROPIC = "sk-" + "ant-api03-" + (B64 * 3)[:93] + "AA"
AWS_ID = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_TEMP_ID = "ASIA" + "Y34FZKBOKMUTVV7A"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
GITHUB = {kind: f"gh{kind}_" + B64 for kind in "pousr"}
GITHUB_PAT = "github_" + "pat_" + "11ABCDEFG0" + "abcdefghij_" + (B64 * 2)[:60]
SLACK = "xox" + "b-1234567890123-1234567890123-" + "AbCdEfGhIjKlMnOpQrStUvWx"
STRIPE = "sk_" + "live_" + "51H8wXyZ" + "AbCdEfGhIjKlMnOp"
STRIPE_RESTRICTED = "rk_" + "live_" + "51H8wXyZ" + "QrStUvWxYzAbCdEf"
GOOGLE = "AI" + "za" + "SyA1b2C3d4E5f6G7h8I9j0K-L_m2N3o4P5q"
JWT = (
    "eyJ" + "hbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJ" + "zdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
BODY = "\n".join([B64 + "+/" + B64[:26]] * 6) + "\n" + B64[:20] + "=="
RSA_KEY = "-----BEGIN RSA " + "PRIVATE KEY-----\n" + BODY + "\n-----END RSA " + "PRIVATE KEY-----"
OPENSSH_KEY = "-----BEGIN OPENSSH " + "PRIVATE KEY-----\n" + BODY + "\n-----END OPENSSH " + "PRIVATE KEY-----"
ENCRYPTED_KEY = (
    "-----BEGIN RSA "
    + "PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n"
    + BODY
    + "\n-----END RSA "
    + "PRIVATE KEY-----"
)
PKCS8_KEY_CUT_SHORT = "-----BEGIN " + "PRIVATE KEY-----\n" + BODY  # no END line: the block ends at the fence


# (rule in secrets.yaml, text, what the rule must catch)
SECRETS_CAUGHT = [
    ("openai-api-key", f"Set OPENAI_API_KEY={OPENAI_PROJECT} in your .env file.", OPENAI_PROJECT),
    ("openai-api-key", f'client = OpenAI(api_key="{OPENAI_PROJECT_LONG}")', OPENAI_PROJECT_LONG),
    ("openai-api-key", f"The service account key is {OPENAI_SVCACCT}, keep it safe.", OPENAI_SVCACCT),
    ("openai-api-key", f"export OPENAI_API_KEY='{OPENAI_LEGACY}'", OPENAI_LEGACY),
    ("anthropic-api-key", f"ANTHROPIC_API_KEY={ANTHROPIC}\nthen run it.", ANTHROPIC),
    ("aws-credentials", f"aws_access_key_id = {AWS_ID}\nregion = us-east-1", AWS_ID),
    ("aws-credentials", f"Temporary credentials: {AWS_TEMP_ID} (expires in 1h).", AWS_TEMP_ID),
    (
        "aws-credentials",
        f"[default]\naws_secret_access_key = {AWS_SECRET}\n",
        f"aws_secret_access_key = {AWS_SECRET}",
    ),
    ("aws-credentials", f'export AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"', f'AWS_SECRET_ACCESS_KEY="{AWS_SECRET}'),
    ("aws-credentials", f'{{"SecretAccessKey": "{AWS_SECRET}"}}', f'SecretAccessKey": "{AWS_SECRET}'),
    *[("github-token", f"git clone https://{token}@github.com/acme/app.git", token) for token in GITHUB.values()],
    ("github-token", f"GITHUB_TOKEN: {GITHUB_PAT}", GITHUB_PAT),
    ("slack-token", f"Use the bot token {SLACK} to post.", SLACK),
    ("stripe-live-key", f"stripe.api_key = '{STRIPE}'", STRIPE),
    ("stripe-live-key", f"restricted: {STRIPE_RESTRICTED}.", STRIPE_RESTRICTED),
    ("google-api-key", f"https://maps.googleapis.com/maps/api/js?key={GOOGLE}&callback=init", GOOGLE),
    ("private-key", f"Here is the key:\n\n```\n{RSA_KEY}\n```\n\nStore it safely.", RSA_KEY),
    ("private-key", f"{OPENSSH_KEY}\n", OPENSSH_KEY),
    ("private-key", f"Encrypted:\n{ENCRYPTED_KEY}\nDone.", ENCRYPTED_KEY),
    ("private-key", f"```\n{PKCS8_KEY_CUT_SHORT}\n```", PKCS8_KEY_CUT_SHORT + "\n"),
    ("private-key", f"The answer was cut off:\n{PKCS8_KEY_CUT_SHORT}", PKCS8_KEY_CUT_SHORT),
    ("jwt", f"Authorization: Bearer {JWT}\n", JWT),
]

# Ordinary text that looks a little like a credential, and must pass untouched.
LOOKALIKES = [
    "Our team has strong skills in task-based design; ask-me-anything sessions run weekly.",
    "Install scikit-learn (sk-learn is a common typo) and create the sk-proj-setup folder.",
    "The commit is 9fceb02d0ae598e95dc970b74767f19372d61af8 on main.",
    "sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "Request id 123e4567-e89b-12d3-a456-426614174000 failed at 2024-01-15T10:30:00Z.",
    "Call (555) 123-4567 or +1 415 555 0100 before 15/01/2024.",
    "api_key = os.environ['OPENAI_API_KEY']  # never hard-code keys",
    "aws_secret_access_key = os.environ['AWS_SECRET_ACCESS_KEY']",
    "aws_secret_access_key=YOUR_SECRET_ACCESS_KEY_GOES_HERE_PLEASE",
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    "My eyes glazed over; the eyJ prefix alone, or eyJhbGciOiJIUzI1NiJ9 by itself, is not a token.",
    "ASIAN MARKETS ROSE; AKIA is just four letters. The ghost ran to gh-pages.",
    "xoxo, see you soon! Test keys like sk_test_4eC39HqLyjWDarjtT1zdp7dc are meant to be shared.",
    "Use --- for a rule, and -----BEGIN to start a block.",
    "The function get_user_by_id_and_organization_slug returns None.",
]

PROSE = (
    "Streaming hides latency: words appear as they are generated. Ask skilled engineers at Acme "
    "how GitHub, Slack, Stripe and AWS keys leak, and they will say it happens in logs and in "
    "answers. My eyes are on the 2024 roadmap, with 42 tasks and 7 owners. "
)


def test_packs_load_with_the_expected_rules(secrets: RuleSet, default: RuleSet) -> None:
    assert [rule.name for rule in secrets.rules] == [
        "openai-api-key",
        "anthropic-api-key",
        "aws-credentials",
        "github-token",
        "slack-token",
        "stripe-live-key",
        "google-api-key",
        "private-key",
        "jwt",
    ]
    assert {rule.action for rule in secrets.rules} == {Action.REDACT}
    (group,) = default.groups
    assert group.paths == ("/v1/*", "/v1beta/*", "/api/*")
    assert [(rule.name, rule.action) for rule in group.rules] == [
        ("secrets", Action.REDACT),
        ("pii", Action.REDACT),
        ("blocked-phrases", Action.ABORT),
        ("completion-budget", Action.ABORT),
        ("stalled", Action.FALLBACK),
    ]
    # Both packs can be loaded together: their rule names do not collide.
    assert len(load_rules([RULES / "default.yaml", RULES / "secrets.yaml"]).rules) == 14


def test_rules_appended_to_default_can_use_the_try_again_fallback(tmp_path: Path) -> None:
    path = tmp_path / "default.yaml"
    path.write_text(
        (RULES / "default.yaml").read_text()
        + "  - name: appended\n    type: banned_patterns\n    phrases: [x]\n    action: fallback\n"
        "    fallback: try-again\n"
    )

    rule = load_rules(path).rules[-1]

    assert rule.name == "appended"
    assert rule.fallback == Fallback("try-again", text="The model stopped responding. Please try again.")


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("rule_name", "text", "secret"), SECRETS_CAUGHT)
def test_secrets_pack_catches(secrets: RuleSet, rule_name: str, text: str, secret: str, size: int | None) -> None:
    assert scan_all(secrets, text, size) == {rule_name: [secret]}


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("rule_name", "text", "secret"), SECRETS_CAUGHT)
def test_default_pack_catches_the_same_secrets(
    default: RuleSet, rule_name: str, text: str, secret: str, size: int | None
) -> None:
    assert scan_all(default, text, size) == {"secrets": [secret]}


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("text", LOOKALIKES)
def test_packs_leave_lookalikes_alone(secrets: RuleSet, default: RuleSet, text: str, size: int | None) -> None:
    assert scan_all(secrets, text, size) == {}
    assert scan_all(default, text, size) == {}


DEMO_KEY = "sk-" + "proj-" + "Zx81Qw72Er63Ty54Ui45Op36As27Df18Gh09Jk1L"


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_default_pack_catches_what_the_demo_model_says(default: RuleSet, size: int | None) -> None:
    text = (
        f"Sure. Your key is {DEMO_KEY}. Project Starlight ships in May. "
        "The customer's SSN is 123-45-6789 and the card is 4111 1111 1111 1111, expiring 12/27."
    )

    assert scan_all(default, text, size) == {
        "secrets": [DEMO_KEY],
        "pii": ["123-45-6789", "4111 1111 1111 1111"],
        "blocked-phrases": ["Project Starlight"],
    }


PII_CAUGHT = [
    ("SSN: 219-09-9999.", "219-09-9999"),
    ("card 5555-5555-5555-4444 on file", "5555-5555-5555-4444"),
    ("pay with 4012888888881881 today", "4012888888881881"),
    ("Discover 6011 1111 1111 1117", "6011 1111 1111 1117"),
]

PII_LOOKALIKES = [
    "Released on 2024-01-15, version 1.2.3, build 20240115.",
    "Call 555-123-4567 or 1-800-555-0199; our ZIP is 94107-1234.",
    "ISBN 978-3-16-148410-0 and order #4111111111111111111 shipped.",
    "Invalid numbers like 000-12-3456, 666-12-3456 and 123-00-4567 are never issued.",
    "Reference 1234 5678 9012 3456 is an internal ticket, not a card.",
    "Projects like Starlight, and project starlights, are different words.",
]


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize(("text", "caught"), PII_CAUGHT)
def test_default_pack_catches_pii(default: RuleSet, text: str, caught: str, size: int | None) -> None:
    assert scan_all(default, text, size) == {"pii": [caught]}


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("text", PII_LOOKALIKES)
def test_default_pack_leaves_pii_lookalikes_alone(default: RuleSet, text: str, size: int | None) -> None:
    assert scan_all(default, text, size) == {}


@pytest.mark.parametrize("pack", ["default.yaml", "secrets.yaml"])
def test_ordinary_prose_is_released_as_it_arrives(pack: str) -> None:
    """Fed a word at a time, no rule holds anything back: every pattern needs a distinctive start."""
    words = [word + " " for word in PROSE.split()]
    for rule in (r for r in load_rules(RULES / pack).rules if isinstance(r.rule, Rule)):
        assert isinstance(rule.rule, Rule)
        checker = rule.rule.checker()
        fed = 0
        for word in words:
            fed += len(word)
            verdict = checker.feed(word)
            assert (rule.name, verdict.safe, verdict.hits) == (rule.name, fed, ())
        assert checker.finish().safe == fed
