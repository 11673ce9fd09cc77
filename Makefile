VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: test test-compiled compiled lint typecheck run bench clean

# The compiled build (setup.py): the core compiled with mypyc, in place in a copy of the tree.
COMPILED := build/compiled

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
	$(VENV)/bin/ruff check guardrail tests bench examples setup.py
	$(VENV)/bin/ruff format --check guardrail tests bench examples setup.py
	$(VENV)/bin/mypy guardrail tests
	$(VENV)/bin/python -m pytest
	$(MAKE) test-compiled

# The whole suite again, against the compiled build (a test checks that it is what runs).
test-compiled: $(COMPILED)/.built
	cd $(COMPILED) && rm -rf tests rules bench examples && cp -r $(addprefix $(CURDIR)/,tests rules bench examples) .
	cd $(COMPILED) && GUARDRAIL_EXPECT_COMPILED=1 PYTHONPATH=$$PWD $(CURDIR)/$(PY) -m pytest -p no:cacheprovider

compiled: $(COMPILED)/.built

$(COMPILED)/.built: $(VENV)/.installed setup.py $(shell find guardrail -name '*.py')
	rm -rf $(COMPILED) && mkdir -p $(COMPILED)
	cp -r guardrail setup.py pyproject.toml README.md LICENSE Makefile $(COMPILED)/
	find $(COMPILED) -name __pycache__ -prune -exec rm -rf {} +
	cd $(COMPILED) && GUARDRAIL_COMPILE=1 $(CURDIR)/$(PY) setup.py --quiet build_ext --inplace --parallel 2
	touch $@

run: $(VENV)/.installed-serve
	$(VENV)/bin/guardrail serve --rules rules/default.yaml --host 127.0.0.1 --port $(PORT)

bench: $(VENV)/.installed $(COMPILED)/.built
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache
