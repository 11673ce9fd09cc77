"""guardrail: guard streaming LLM answers in flight."""
