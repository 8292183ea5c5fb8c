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
# make eval
EVAL_SET ?= ../shared/eval/clinc150_val.jsonl
EVAL_ROUTES ?= ../shared/eval/clinc150_routes.json
EVAL_ARGS ?=

PROTO_SRC := $(wildcard protos/grpc_router/v1/*.proto)
PROTO_STAMP := src/grpc_router/v1/.stamp

.PHONY: help install proto export export-encoder serve test lint format bench eval node clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "  variables: MODEL=$(MODEL) REVISION= NAME= VARIANTS= OUT=$(OUT) CONFIG=$(CONFIG) BENCH_ARGS= EVAL_SET= EVAL_ROUTES="

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[export,dev]'
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
examples/node/node_modules: examples/node/package.json
	cd examples/node && npm install --no-audit --no-fund --silent
	@touch $@

lint: install ## ruff and mypy --strict
	$(BIN)/ruff check src tests export
	$(BIN)/ruff format --check src tests export
	$(BIN)/mypy --strict src/grpc_router

format: install ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests export
	$(BIN)/ruff format src tests export

test: install node lint ## lint, then the whole test suite (builds its own tiny models)
	$(PY) -m pytest -q -m 'not slow'

bench: install ## benchmark engines vs baselines on the full-shape model (BENCH_ARGS="--layers 4" for a quick run)
	$(PY) -m tests.bench $(BENCH_ARGS)
	$(PY) -m tests.bench.extproc
	$(PY) -m tests.encoder.bench_cascade

eval: install ## routing quality on EVAL_SET with EVAL_ROUTES (EVAL_ARGS="--engine encoder")
	$(BIN)/grpc-router eval '$(EVAL_SET)' --routes '$(EVAL_ROUTES)' $(EVAL_ARGS)

clean: ## remove the venv, generated stubs and caches (keeps artifacts/)
	rm -rf $(VENV) src/grpc_router/v1 .mypy_cache .ruff_cache .pytest_cache examples/node/node_modules
