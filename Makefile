# dmlnb: the two commands of the README, and a few more.
#   make demo   - set up .venv on first use, train a baseline and an SSR model briefly on glyphs, write figures
#   make test   - set up .venv on first use, run the test suite
#   make trained-runs - retrain the small baseline and SSR runs shipped in notebooks/trained
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast figures study study-pretrained glyphs trained-runs lint bench clean-venv

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

# every figure as PNG + interactive HTML in figures/; the executed notebooks in figures/notebooks/,
# each also as a static .html page (figures as the PNGs stored with them; --no-html: none)
figures: $(STAMP)
	$(BIN)/dmlnb figures --out figures

study: $(STAMP)
	$(BIN)/dmlnb study --out study

# the study in the pretrained regime (EfficientNet-Lite0 on glyphs and icons; finished points are
# reused, so it can be stopped and continued), its tables spliced into the README
study-pretrained: $(STAMP)
	$(BIN)/dmlnb study --regime pretrained --out study/pretrained --jobs 2 --readme README.md

glyphs: $(STAMP)
	$(BIN)/python tools/build_glyphs.py

# the small baseline and SSR runs the notebooks open on: `dmlnb train` with the package defaults
# (small CNN, glyphs), seed 0, --ssr / --no-ssr, on one CPU thread, in notebooks/runs/trained-build
# (ignored; a finished run there is reused: delete it to retrain), then exported slim (model
# weights only, no embeddings) to notebooks/trained/ with dmlnb.runs.export_run
TRAINED_BUILD := notebooks/runs/trained-build
EXPORT_RUN := $(BIN)/python -c "import sys; from dmlnb.runs import export_run; export_run(sys.argv[1], sys.argv[2], replace=True)"

trained-runs: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/dmlnb train --seed 0 --ssr --device cpu --quiet --resume --run_dir $(TRAINED_BUILD)/glyphs-ssr
	OMP_NUM_THREADS=1 $(BIN)/dmlnb train --seed 0 --no-ssr --device cpu --quiet --resume --run_dir $(TRAINED_BUILD)/glyphs-baseline
	$(EXPORT_RUN) $(TRAINED_BUILD)/glyphs-ssr notebooks/trained/glyphs-ssr
	$(EXPORT_RUN) $(TRAINED_BUILD)/glyphs-baseline notebooks/trained/glyphs-baseline
	du -sh notebooks/trained

lint: $(STAMP)
	$(BIN)/ruff check dmlnb tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_views.py
	$(BIN)/python benchmarks/bench_train.py

clean-venv:
	rm -rf $(VENV)
