VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: test lint typecheck run bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/ruff check guardrail tests bench examples
	$(VENV)/bin/ruff format --check guardrail tests bench examples
	$(VENV)/bin/mypy guardrail tests
	$(VENV)/bin/python -m pytest

run: $(VENV)/.installed
	$(VENV)/bin/guardrail serve --rules rules/default.yaml --host 127.0.0.1 --port $(PORT)

bench: $(VENV)/.installed
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
