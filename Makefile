# The README's two set-up commands: `make run` (train the default model) and `make test`.
# Both create a virtual environment in .venv and install what they need (torch pinned to a CPU-sized
# build so a CPU machine does not pull a multi-GB CUDA wheel).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
OUT ?= runs/default

.PHONY: install run test lint bench clean tiny-tables

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Train the default EvoMoE GPT on the built-in corpus; a rerun resumes or reprints the finished run.
# The fast mode: compiled, bf16 autocast (fp32 master weights), fused AdamW; bitwise reproducible run to
# run; within 0.013 of the default preset's eager fp32 (docs/performance.md, "Compiled training").
FAST = --train.compile=true --train.precision=bf16 --train.optimizer_impl=fused
run: $(STAMP)
	$(BIN)/evomoe train default --out $(OUT) --resume $(FAST)

# lint first: CI runs `make test`, so the house style is checked on every submission
test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# docs/results.md sections 4-5 and the README numbers from them against fresh runs (~12 min on 2 cores);
# exit 1 when a documented value is stale. `$(BIN)/python benchmarks/tiny_tables.py --write` rewrites them.
tiny-tables: $(STAMP)
	$(BIN)/python benchmarks/tiny_tables.py --out runs/tiny_tables

clean:
	rm -rf $(VENV) runs
