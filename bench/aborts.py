"""Aborted answers stop the app: the README's example app relaying a real upstream, 1,000 aborts in a row.

The upstream streams the key at once and then keeps generating; ``examples/fastapi_app.py``
relays it behind GuardrailMiddleware with ``rules/default.yaml``, which ends every answer early.
For each aborted answer, the time from the client's last byte to the upstream's stream being
closed is measured; afterwards an ordinary request must still be answered (the example's
connection pool of 100 was exhausted after about 110 aborts before generators were closed).

    python bench/aborts.py [--aborts 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import serve_in_thread
from tests.test_abort_closes_app import Upstream, _fresh_import, ask


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--aborts", type=int, default=1000)
    args = parser.parse_args()
    upstream = Upstream()
    delays: list[float] = []
    with serve_in_thread(upstream.app()) as upstream_url:
        import os

        os.environ["UPSTREAM"] = f"{upstream_url}/v1"
        example = _fresh_import("examples.fastapi_app")
        with serve_in_thread(example.app) as base_url, httpx.Client() as client:
            for number in range(args.aborts):
                ask(client, base_url, "key please")
                answered = time.monotonic()
                deadline = answered + 10
                while len(upstream.closed_at) <= number and time.monotonic() < deadline:
                    time.sleep(0.0005)
                if len(upstream.closed_at) <= number:
                    print(f"abort {number}: the upstream stream was not closed within 10 s")
                    return
                delays.append(max(0.0, upstream.closed_at[number] - answered))
            ordinary = "Hello" in ask(client, base_url, "hello")
    delays.sort()
    print(
        f"{args.aborts} aborted answers: upstream stream closed after median "
        f"{statistics.median(delays) * 1000:.1f} ms, "
        f"p99 {delays[int(len(delays) * 0.99) - 1] * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms "
        f"(from the client's last byte); an ordinary request afterwards: {'answered' if ordinary else 'FAILED'}"
    )


if __name__ == "__main__":
    main()
