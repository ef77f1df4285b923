# recsvc: `make demo` and `make test` each work as the first command on a fresh clone.
SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/recsvc/v1/*.proto)
PROTO_OUT := $(patsubst protos/%.proto,%_pb2.py,$(PROTO_SRC))
# GPU=1 installs faiss-gpu instead of faiss-cpu (CUDA hosts).
GPU ?= 0
DEMO_DIR ?= demo

.PHONY: setup proto demo test test-all lint bench bench-baselines clean help

help:
	@echo "make setup   - create .venv and install (idempotent)"
	@echo "make demo    - synthetic data -> train bundle -> evaluate -> serve -> query"
	@echo "make test    - fast test suite (make test-all adds slow tests)"
	@echo "make lint    - ruff"
	@echo "make bench   - benchmarks (needs ../shared/data for the H&M ones)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this takes the CPU build already on the machine.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	@if [ "$(GPU)" = "1" ]; then $(PIP) uninstall -y -q faiss-cpu; $(PIP) install -q faiss-gpu; fi
	@touch $(STAMP)

setup: $(STAMP) proto

proto: $(STAMP) $(PROTO_OUT)

recsvc/v1/%_pb2.py: protos/recsvc/v1/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--python_out=. --grpc_python_out=. --mypy_out=. $<

demo: setup
	$(PY) -m training.demo --workdir $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

lint: setup
	$(VENV)/bin/ruff check recsvc training tests benchmarks
	$(VENV)/bin/ruff format --check recsvc training tests benchmarks

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-out recsvc/v1/*_pb2*.py*
