# Two entry points (README quick start):
#   make demo   set up .venv and run the main job, `ssiu demo`, on the embedded photos
#   make test   set up .venv and run the tests and the ahead-of-time kernel compile check
# CPU machines get the pinned CPU build of torch; a machine with an NVIDIA driver gets
# torch (a CUDA build) from the package's declared range (see README).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow mutants check-kernels check-kernels-all bench gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA driver found: installing torch from the package's range"; \
	else \
		$(BIN)/python -m pip install --quiet $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/ssiu demo

# spandrel (tests/test_spandrel.py) imports torchvision; the CPU torchvision build is not
# on PyPI, so CPU machines take the one matching torch 2.13 and the tests declare the one
# operator it fails to register. Test-only: `make demo` does not install these.
TEST_EXTRAS_CPU ?= torchvision==0.28.0 spandrel==0.4.2
$(VENV)/.test-extras: $(STAMP)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet $(TORCH_CPU) $(TEST_EXTRAS_CPU); \
	fi
	touch $@

# --strict-access: a launched kernel moving 2 bytes or less a lane in a global load or
# store fails (README, "Performance model").
test: setup $(VENV)/.test-extras
	$(BIN)/python -m pytest -q
	$(BIN)/ssiu check-kernels --arch 90 --arch 80 --strict-access

# The heavy tests left out of `make test`: whole-model parity through the interpreter,
# torch.compile, export.
test-slow: setup $(VENV)/.test-extras
	$(BIN)/python -m pytest -q -m "slow and not mutants"

# Planted bugs (tests/mutants.py): each must make the parity tests fail; prints a table.
mutants: setup
	$(BIN)/python tests/mutants.py --jobs 2

check-kernels: setup
	$(BIN)/ssiu check-kernels --arch 90 --arch 80 --strict-access

# Everything check-kernels can prove, under both Triton versions of the pyproject range:
# the launches of all workloads (also the C = 16 and 32 widths) plus every registered
# config no launch reaches, with .venv's triton and with triton 3.6 (the GPU machines').
# The 3.6 side venv holds only triton and reuses .venv's packages. About an hour on 2
# cores from an empty cache; CI runs `make check-kernels`. The launches are checked with
# --strict-access; the registry extras (plain i32 signatures: no stride-1 or
# divisibility specialisation, so not the access widths of any launch) for spills and
# registers only (the second command reuses the first's cached launch rows).
T36_VENV ?= .venv-t36
T36_TRITON ?= triton==3.6.0
CHECK_RUN = check-kernels --arch 90 --arch 80 --workload all --strict-access
CHECK_ALL = check-kernels --arch 90 --arch 80 --workload all --registry extras
$(T36_VENV)/.installed: $(STAMP)
	$(PYTHON) -m venv $(T36_VENV)
	$(T36_VENV)/bin/python -m pip install --quiet --no-deps $(T36_TRITON)
	site=$$($(T36_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	$(BIN)/python -c "import sys; print('\n'.join(p for p in sys.path if p.endswith('-packages')))" \
		> $$site/_ssiu_main_venv.pth; \
	cp $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/__editable__*ssiu* $$site/
	touch $@

check-kernels-all: setup $(T36_VENV)/.installed
	$(BIN)/ssiu $(CHECK_RUN)
	$(T36_VENV)/bin/python -m ssiu $(CHECK_RUN)
	$(BIN)/ssiu $(CHECK_ALL)
	$(T36_VENV)/bin/python -m ssiu $(CHECK_ALL)

bench: setup
	$(BIN)/ssiu bench --quick

# The prepared GPU check (README, "Running the GPU check"): on a lent GPU machine it runs
# with that machine's python3 and packages, offline, in at most 8 minutes, and writes to
# $$OUT (else bench/reports/gpu-check-<date>). DRY=1: the same parts at toy sizes on this
# CPU (the .venv), through the Triton interpreter.
GPU_PYTHON ?= python3
ifdef DRY
gpu-check: setup
	$(BIN)/python bench/gpu_check.py --dry
else
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py
endif

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(T36_VENV) demo_out .pytest_cache
