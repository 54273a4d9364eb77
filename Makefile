# Two entry points (README): `make train` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# torch is installed first, on its own, so that the other requirements never pull another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup train test lint bench validate aot compat gpu-wheels gpu-window clean

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

# the GPU machines' software pair (torch 2.11 + triton 3.6) in a second venv, on the CPU: the whole suite in
# the interpreter and every kernel built for their sm_90 (docs/BENCHMARKS.md, "GPU build facts", also has
# all four archs with it). torch 2.11.0 from PyPI is its CUDA build (~4.6 GB; it runs on the CPU) and
# brings triton 3.6.0.
COMPAT_VENV := .venv-compat
COMPAT_TORCH ?= torch==2.11.0
compat:
	test -x $(COMPAT_VENV)/bin/python || $(PY) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -c "import torch" 2>/dev/null || $(COMPAT_VENV)/bin/python -m pip install -q "$(COMPAT_TORCH)"
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[dev]"
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider
	TRITON_INTERPRET=0 $(COMPAT_VENV)/bin/python -m kernels.aot --arch 90

# A lent GPU machine's python has torch and triton but not the training stack: `make gpu-wheels` puts
# what tools/gpu_window.py's training and augmentation steps need in .whl/ (the versions this venv
# tests, built for the machine's Python 3.12; 1.7 MB on 2026-12-08), to carry with the call (docs/KERNELS.md, "A GPU window").
GPU_PYTHON ?= 3.12
GPU_STACK := hydra-core omegaconf mlxtend
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
PINS = $(VPY) -c "import importlib.metadata as m, sys; print(' '.join(n + '==' + m.version(n) for n in sys.argv[1:]))"
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		$(GPU_PLATFORMS) -d .whl $$($(PINS) $(GPU_STACK))
	# hydra's parser runtime is published as a source archive only: build its (pure-Python) wheel here
	$(VPY) -m pip wheel -q --no-deps -w .whl $$($(PINS) antlr4-python3-runtime)
	ls .whl

# on the GPU machine (or `python3 tools/gpu_window.py --plan` anywhere): validate, gpu tests, training smoke, timings
gpu-window:
	python3 tools/gpu_window.py --out $${OUT:-outputs/gpu_window}

clean:
	rm -rf $(VENV) $(COMPAT_VENV) outputs multirun wandb .pytest_cache
