# Two entry points (README): `make train` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# torch is installed first, on its own, so that the other requirements never pull another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup train test lint bench validate aot clean

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

# on a CUDA GPU: correctness, determinism, the model and timings of the kernels (docs/KERNELS.md)
validate: setup
	TRITON_INTERPRET=0 $(VPY) -m kernels.validate --out outputs/validate

# without a GPU: build every kernel for A100, RTX 30xx/A10, RTX 40xx/L4/L40S, H100 and check the limits
aot: setup
	TRITON_INTERPRET=0 $(VPY) -m kernels.aot --arch 80,86,89,90

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
