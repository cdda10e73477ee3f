# The two commands: `make demo` runs the whole chain on the embedded toy dataset,
# `make test` runs the test suite. Both create .venv (plain venv + pip) on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.cpgan-installed
ARTIFACTS ?= artifacts

.PHONY: install test demo clean-artifacts

install: $(STAMP)

$(STAMP): setup.py setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(BIN)/cpgan-prep make-toy --artifacts $(ARTIFACTS)
	$(BIN)/cpgan-prep vocab --artifacts $(ARTIFACTS)
	$(BIN)/cpgan-prep status --artifacts $(ARTIFACTS)

clean-artifacts:
	rm -rf $(ARTIFACTS)/*/ $(ARTIFACTS)/*.json $(ARTIFACTS)/*.h5 $(ARTIFACTS)/*.parquet
