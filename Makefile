# dmlnb: the two commands of the README, and a few more.
#   make demo   - set up .venv on first use, train a baseline and an SSR model briefly on glyphs, write figures
#   make test   - set up .venv on first use, run the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast figures study glyphs lint bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dmlnb demo --out figures/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

figures: $(STAMP)
	$(BIN)/dmlnb figures --out figures

study: $(STAMP)
	$(BIN)/dmlnb study --out study

glyphs: $(STAMP)
	$(BIN)/python tools/build_glyphs.py

lint: $(STAMP)
	$(BIN)/ruff check dmlnb tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_views.py
	$(BIN)/python benchmarks/bench_train.py

clean-venv:
	rm -rf $(VENV)
