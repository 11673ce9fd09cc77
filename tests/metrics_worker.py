"""A worker process for the multiprocess test in ``test_metrics.py``.

Run as ``python metrics_worker.py STREAMS OPEN`` with ``PROMETHEUS_MULTIPROC_DIR`` set: it counts
STREAMS complete streams (one delta, one redact each) and OPEN streams left in flight, then exits,
leaving its values in the directory for the parent to scrape.
"""

from __future__ import annotations

import sys

from guardrail.metrics import GuardMetrics


def main(streams: int, still_open: int) -> None:
    """Report the given numbers of streams to the default registry, as a worker of a real app would."""
    metrics = GuardMetrics()
    for _ in range(streams):
        metrics.stream_started("openai_chat")
        metrics.delta("openai_chat", 2e-5)
        metrics.intervention("api-keys", "redact")
        metrics.stream_finished("openai_chat", "completed", duration=0.5, time_to_first_token=0.1)
    for _ in range(still_open):
        metrics.stream_started("openai_chat")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
