"""The sans-IO core: framing, dialects and the per-stream engine.

Nothing here does I/O or reads a clock: bytes and time come in as arguments, bytes and
decisions go out as values (the h11 model). Shells in ``guardrail.asgi`` and
``guardrail.proxy`` move them.
"""
