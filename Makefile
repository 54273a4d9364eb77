# Two entry points (README): `make train` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# torch is installed first, on its own, so that the other requirements never pull another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup train test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(VPY) train.py

test: setup
	TRITON_INTERPRET=1 $(VPY) -m pytest -q

lint: setup
	$(VPY) -m ruff check .

bench: setup
	$(VPY) benchmark.py

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
