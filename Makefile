# danmul: set-up, tests and the demo. `make demo` and `make test` each set up what they need first.
#
# The virtual environment is reused while pyproject.toml is unchanged (its hash names the stamp
# file); any change to the dependencies reinstalls. torch/torchvision are installed first as the
# pinned pair (see pyproject.toml) so the rest of the resolver never picks another torch.

SHELL  := /bin/bash
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
REQ_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-16)
STAMP  := $(VENV)/.danmul-installed-$(REQ_HASH)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PIP    := $(BIN)/python -m pip --disable-pip-version-check
# pip on these machines warns once per package about an absent local index folder: noise, not news.
PIPQ   := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

DEMO_OUT ?= demo-out
# Test processes for `make test`. Each test file runs whole in one of them (its module fixtures, such as a
# Serve app, are set up once); on 2 cores two processes fill the time the tests spend waiting on services.
TEST_WORKERS ?= 2

.PHONY: help setup venv system-deps test test-fast lint demo bench-build clean

help:
	@echo "make demo        set up, then run the whole system end to end on embedded defaults"
	@echo "make test        set up, then run lint and every test (what CI runs)"
	@echo "make test-fast   unit tests only (no services; under a minute)"
	@echo "make bench-build the Dan:mul build benchmark (1,000,000 metadata lines)"

setup: venv system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (danmul needs Python 3.11)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PIP) install -q --upgrade pip $(PIPQ)
	set -o pipefail; $(PIP) install -q torch==2.14.1 torchvision==0.29.1 $(PIPQ)
	set -o pipefail; $(PIP) install -q -e '.[dev]' $(PIPQ)
	$(BIN)/python -c "import torch, torchvision, timm, ray, pyarrow, redis, moto" 
	rm -f $(VENV)/.danmul-installed-*
	touch $@

# Redis and Prometheus (with promtool) come from the OS packages; the tests start their own instances.
system-deps:
	@if command -v redis-server >/dev/null && command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
	  true; \
	elif command -v apt-get >/dev/null; then \
	  echo "installing redis-server and prometheus from the OS packages"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server prometheus >/dev/null; \
	else \
	  echo "error: need redis-server and prometheus on PATH (apt-get not available to install them)"; exit 1; \
	fi

lint: venv
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: venv
	$(BIN)/python -m pytest tests/unit -q

demo: setup
	$(BIN)/danmul demo --out $(DEMO_OUT)

bench-build: venv
	$(BIN)/danmul bench build --lines 100000 --lines 1000000

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
