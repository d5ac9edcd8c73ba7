# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Optional extras installed with spar: EXTRAS=dev,app adds Gradio (the page and its browser test).
EXTRAS ?= dev

.PHONY: install demo app test test-fast test-gpu lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Distil the tiny backbone on the bundled images, then compare teacher, pretrained and distilled.
DEMO_DIR ?= outputs/demo
# Each `make demo` starts afresh: a run folder that holds a run is only reused with resume=.
demo: install
	rm -rf $(DEMO_DIR)
	$(PY) scripts/train.py hydra.run.dir=$(DEMO_DIR)/train
	$(PY) scripts/demo.py checkpoint=$(DEMO_DIR)/train/checkpoints/best.safetensors \
		hydra.run.dir=$(DEMO_DIR)/pictures

# The interactive page on http://127.0.0.1:7860, with the app extra (Gradio) installed first.
$(VENV)/.installed-app: $(VENV)/.installed
	$(PY) -m pip install -e ".[app]"
	touch $@

app: $(VENV)/.installed-app
	$(PY) scripts/app.py

lint: install
	$(PY) -m ruff check spar scripts tests examples
	$(PY) -m ruff format --check spar scripts tests examples

# Two pytest-xdist workers (one torch thread each, tests/conftest.py) on the two-core machine.
test: lint
	$(PY) -m pytest -q -n 2

# The fast tier: the suite less the tests marked slow (end-to-end sweeps, torchrun runs, ...).
test-fast: lint
	$(PY) -m pytest -q -n 2 -m "not slow"

# The GPU tier (tests/gpu): every script, the demo and the README's notebook code on CUDA, fp32 and
# bf16; skipped without CUDA. SPAR_TEST_DEVICE=cpu runs it on the CPU (checks the tier itself).
test-gpu: install
	$(PY) -m pytest -q -p no:cacheprovider -m gpu tests/gpu

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
