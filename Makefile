VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: test lint typecheck run bench clean

# Two installs into the same .venv, each with its own stamp: `make run` needs only what serving
# needs (a minute on a fresh machine); `make test` adds the dev and bench tools, and covers both.
$(VENV)/.created:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-serve: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@ $(VENV)/.installed-serve

test: $(VENV)/.installed
	$(VENV)/bin/ruff check guardrail tests bench examples
	$(VENV)/bin/ruff format --check guardrail tests bench examples
	$(VENV)/bin/mypy guardrail tests
	$(VENV)/bin/python -m pytest

run: $(VENV)/.installed-serve
	$(VENV)/bin/guardrail serve --rules rules/default.yaml --host 127.0.0.1 --port $(PORT)

bench: $(VENV)/.installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
