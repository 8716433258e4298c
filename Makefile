# Two commands on a fresh machine: `make run` (the studio in the browser) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow test-gpu system-deps clean

setup: $(STAMP)

# A CPU-only machine gets the CPU build of torch (torch==2.13.0 resolves to a local CPU wheel here);
# a machine with an NVIDIA driver gets the default (CUDA) build plus xformers.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(PIP) install -q torch && $(PIP) install -q -e ".[dev,cuda]"; \
	else \
	  $(PIP) install -q torch==2.13.0 && $(PIP) install -q -e ".[dev]"; \
	fi
	touch $(STAMP)

# Debian packages: Fashion-MNIST (pretraining data) and chromium (browser tests). Installed only if missing.
system-deps:
	@missing=""; \
	test -d /usr/share/datasets/fashion-mnist || missing="$$missing dataset-fashion-mnist"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi

run: setup
	$(PY) app.py

test: setup system-deps
	$(PY) -m pytest -q

test-slow: setup system-deps
	$(PY) -m pytest -q -m slow

test-gpu: setup
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .pytest_cache
