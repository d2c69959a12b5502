# Everything installs into ./.venv with pinned versions; `make run` and `make test` work on a fresh machine.
VENV   := .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed
PROMPT ?= def fibonacci(n):

.PHONY: run test test-all clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## generate with the embedded default model
	$(VENV)/bin/dsv3 generate --max-tokens 64 "$(PROMPT)"

test: $(STAMP)  ## the default (fast) suite, as CI runs it
	$(VENV)/bin/pytest -q

test-all: $(STAMP)  ## including tests marked slow
	$(VENV)/bin/pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache
