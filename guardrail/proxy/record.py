"""``guardrail serve --record DIR``: each answer as the model sent it, one file per stream, for ``guardrail replay``.

:class:`StreamRecorder` sits between the guard and the model (the upstream or the demo model),
so it sees every byte before any rule does. Each 2xx answer on a guarded path is written to its
own file in the directory, as it arrives; a content encoding (gzip, deflate, br) is decoded
first, so the file is what ``guardrail replay`` reads. Nothing else is written: no request,
no headers (so no credentials), no answers of unguarded paths. The files do hold model text:
whatever the rules would have cut or redacted is there in full.

File names sort by time and say which endpoint answered: ``20250102T030405-4242-0007-v1-chat-completions.sse``
(time, process id, the process's stream count, the path), with ``.sse``, ``.ndjson``, ``.json`` or
``.txt`` after the answer's content type. Replay a non-chat answer with ``--path`` set to its path.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from pathlib import Path
from typing import BinaryIO

from guardrail._types import ASGIApp, Message, Receive, Scope, Send
from guardrail.asgi.encoding import ContentDecoder, DecodeError

logger = logging.getLogger(__name__)

_EXTENSIONS = {b"text/event-stream": ".sse", b"application/x-ndjson": ".ndjson", b"application/json": ".json"}
_NOT_NAME = re.compile(r"[^A-Za-z0-9]+")


class StreamRecorder:
    """ASGI app recording the answers of ``app`` into ``directory``, then passing them on unchanged.

    Args:
        app: the model app (upstream proxy or demo model).
        directory: where the recordings go; created if missing.
    """

    def __init__(self, app: ASGIApp, directory: str | os.PathLike[str]) -> None:
        self.app = app
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recording = _Recording(self._path_for(scope.get("path", "")), send)
        try:
            await self.app(scope, receive, recording.send)
        finally:
            recording.close()

    def _path_for(self, request_path: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        name = _NOT_NAME.sub("-", request_path).strip("-") or "root"
        return self.directory / f"{stamp}-{os.getpid()}-{next(self._count):04d}-{name}"


class _Recording:
    """One answer's recording: opened at the response start if the answer is a 2xx, closed at the end."""

    def __init__(self, stem: Path, send: Send) -> None:
        self.stem = stem
        self.downstream = send
        self.file: BinaryIO | None = None
        self.decoder: ContentDecoder | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._open(message)
        elif message["type"] == "http.response.body" and self.file is not None:
            self._write(bytes(message.get("body", b"")), more=bool(message.get("more_body", False)))
        await self.downstream(message)

    def _open(self, start: Message) -> None:
        if not 200 <= int(start.get("status", 200)) < 300:
            return
        headers = {name.lower(): value for name, value in start.get("headers", [])}
        content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        encoding = headers.get(b"content-encoding", b"identity").strip().lower().decode("latin-1")
        if encoding != "identity":
            if not ContentDecoder.supports(encoding):
                logger.warning("not recording an answer in content-encoding %r, which cannot be decoded here", encoding)
                return
            self.decoder = ContentDecoder(encoding)
        path = self.stem.with_name(self.stem.name + _EXTENSIONS.get(content_type, ".txt"))
        self.file = path.open("xb")  # never overwrites an earlier recording
        logger.debug("recording the answer to %s", path)

    def _write(self, data: bytes, *, more: bool) -> None:
        assert self.file is not None
        if self.decoder is not None:
            try:
                data = self.decoder.decode(data) + (b"" if more else self.decoder.flush())
            except DecodeError as exc:
                logger.warning("stopped recording %s: %s", self.file.name, exc)
                self.close()
                return
        self.file.write(data)
        self.file.flush()  # a stream cut short is still on disk up to where it stopped

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
