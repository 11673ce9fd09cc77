"""No request stalls the others: 20 streams at model pace while an 8 MB prompt and a hostile pattern run.

A FastAPI app behind GuardrailMiddleware streams answers at one delta every 20 ms. Twenty
ordinary streams run while one request brings an 8 MB prompt (with a prompt budget, so it must
be counted) and one stream meets a pathological pattern. Reports, for the ordinary streams, the
longest wait for a delta beyond the 20 ms pace (median and max over rounds), and how the two
hostile requests ended.

    python bench/stall.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guardrail.asgi import GuardrailMiddleware
from guardrail.config import RuleSet
from guardrail.core.rule import Action, BoundRule
from guardrail.rules.banned import BannedPatterns
from guardrail.rules.budget import TokenBudget
from guardrail.tokenizers import get_encoding
from tests.apps import ChatChunks
from tests.servers import serve_in_thread

PACE = 0.02
DELTAS = 100
STREAMS = 20


def app() -> FastAPI:
    chunks = ChatChunks()
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def complete(request: Request) -> StreamingResponse:
        await request.body()
        hostile = request.headers.get("x-hostile") == "1"

        async def body() -> AsyncIterator[bytes]:
            yield chunks.role()
            for n in range(DELTAS):
                await asyncio.sleep(PACE)
                yield chunks.content(("a" * 30 + "!") if hostile else f" word{n}")
            yield chunks.finish() + b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    encoding = get_encoding("o200k_base")
    rules = [
        BoundRule("budget", TokenBudget(encoding, max_prompt_tokens=100_000), Action.ABORT),
        BoundRule("hostile", BannedPatterns(patterns=[r"(?:a|aa)+(?:a|aa)*b"]), Action.ABORT),
    ]
    api.add_middleware(GuardrailMiddleware, rules=RuleSet.from_rules(rules, paths=["/v1/*"]))
    return api


async def ordinary(client: httpx.AsyncClient, gaps: list[float]) -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        last = time.perf_counter()
        async for _ in response.aiter_raw():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now


async def round_once(base_url: str) -> tuple[float, str, str]:
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        big = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "lorem ipsum " * 700_000}]}
        hostile = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

        async def big_prompt() -> str:
            response = await client.post("/v1/chat/completions", content=json.dumps(big))
            return f"{response.status_code} {response.json()['error']['code'] if response.status_code != 200 else 'ok'}"

        async def hostile_stream() -> str:
            response = await client.post("/v1/chat/completions", json=hostile, headers={"x-hostile": "1"})
            return "error event" if '"error"' in response.text else "completed"

        results = await asyncio.gather(
            *(ordinary(client, gaps) for _ in range(STREAMS)), big_prompt(), hostile_stream()
        )
    return max(gaps) - PACE, str(results[-2]), str(results[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    waits = []
    with serve_in_thread(app()) as base_url:
        for _ in range(args.rounds):
            wait, big, hostile = asyncio.run(round_once(base_url))
            waits.append(wait * 1000)
            print(f"  round: longest wait beyond the pace {wait * 1000:.1f} ms; 8 MB prompt: {big}; hostile: {hostile}")
    print(
        f"{STREAMS} streams: longest wait for a delta beyond the {PACE * 1000:.0f} ms pace, "
        f"median {statistics.median(waits):.1f} ms, max {max(waits):.1f} ms over {args.rounds} rounds"
    )


if __name__ == "__main__":
    main()
