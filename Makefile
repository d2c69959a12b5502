# Everything installs into ./.venv with pinned versions; `make run` and `make test` work on a fresh machine.
VENV   := .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed
PROMPT ?= def fibonacci(n):

.PHONY: run test test-all clean default-model

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

# Rebuild the embedded default model from the interpreter's standard library (docs/pretrain.md).
# Training resumes from runs/pretrain-tiny/checkpoints, so the recipe can be run in several sittings.
default-model: $(STAMP)
	mkdir -p build/stdlib
	cd "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" && \
	  find . -name '*.py' -not -path './site-packages/*' -print0 | xargs -0 cp --parents -t "$(CURDIR)/build/stdlib"
	test -f build/tok/tokenizer.json || $(VENV)/bin/dsv3 tokenizer train --files 'build/stdlib/**/*.py' --vocab-size 8192 -o build/tok
	test -f build/shards/manifest.json || $(VENV)/bin/dsv3 data build --inputs build/stdlib --include '*.py' \
	  --tokenizer build/tok -o build/shards --heldout-fraction 0.02 -q
	$(VENV)/bin/dsv3 pretrain --config configs/pretrain-tiny.yaml --data build/shards --out runs/pretrain-tiny
	cp runs/pretrain-tiny/final/config.json runs/pretrain-tiny/final/model.safetensors runs/pretrain-tiny/final/tokenizer.json \
	  runs/pretrain-tiny/final/tokenizer_config.json runs/pretrain-tiny/final/special_tokens_map.json src/dsv3/data/default/
