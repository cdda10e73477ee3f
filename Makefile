# The two commands: `make demo` runs the whole chain on the embedded toy dataset,
# `make test` runs the test suite. Both create .venv (plain venv + pip) on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.cpgan-installed
ARTIFACTS ?= artifacts
PREP := $(BIN)/cpgan-prep
TRAIN := $(BIN)/cpgan-train
EVAL := $(BIN)/cpgan-eval
A := --artifacts $(ARTIFACTS)

.PHONY: install test demo clean-artifacts

install: $(STAMP)

$(STAMP): setup.py setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# One line per stage with its key figure; every stage skips work that is already done.
# The whole chain is budgeted at 30 minutes on two idle CPU cores (measured: RESULTS.md).
demo: $(STAMP)
	$(PREP) make-toy $(A)
	$(PREP) vocab $(A)
	$(PREP) train-detector $(A)
	$(PREP) detect --split train2014 $(A)
	$(PREP) detect --split val2014 $(A)
	$(PREP) train-attention $(A)
	$(PREP) attend --split train2014 $(A)
	$(PREP) build-memory --topk 5 $(A)
	$(EVAL) fit-classifier $(A)
	$(TRAIN) --stage damsm $(A)
	$(TRAIN) --stage damsm --no-memory $(A)
	$(TRAIN) --stage gan $(A)
	$(EVAL) $(A)
	$(PREP) status $(A)
	@echo "report: $(ARTIFACTS)/report/index.html"

clean-artifacts:
	rm -rf $(ARTIFACTS)/*/ $(ARTIFACTS)/*.json $(ARTIFACTS)/*.h5 $(ARTIFACTS)/*.parquet
