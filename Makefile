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

.PHONY: setup demo test test-slow mutants check-kernels bench lint clean

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

test: setup $(VENV)/.test-extras
	$(BIN)/python -m pytest -q
	$(BIN)/ssiu check-kernels --arch 90 --arch 80

# The heavy tests left out of `make test`: whole-model parity through the interpreter,
# torch.compile, export.
test-slow: setup $(VENV)/.test-extras
	$(BIN)/python -m pytest -q -m "slow and not mutants"

# Planted bugs (tests/mutants.py): each must make the parity tests fail; prints a table.
mutants: setup
	$(BIN)/python tests/mutants.py --jobs 2

check-kernels: setup
	$(BIN)/ssiu check-kernels --arch 90 --arch 80

bench: setup
	$(BIN)/ssiu bench --quick

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo_out .pytest_cache
