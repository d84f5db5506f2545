# Two entry points (README quick start):
#   make demo   set up .venv and run the main job, `ssiu demo`, on the embedded photos
#   make test   set up .venv and run the tests and the ahead-of-time kernel compile check
# CPU machines get the pinned CPU build of torch; a machine with an NVIDIA driver keeps
# whatever torch is already in the environment it was set up with (see README).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test check-kernels bench lint clean

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

test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/ssiu check-kernels --arch 90 --arch 80

check-kernels: setup
	$(BIN)/ssiu check-kernels --arch 90 --arch 80

bench: setup
	$(BIN)/python bench/run.py --quick

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo_out .pytest_cache
