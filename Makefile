# Two commands do all set-up on a fresh machine:
#   make run    # virtual environment + dependencies, then the default analysis on the offline demo models
#   make test   # virtual environment + dependencies, then the test suite and ruff
# TORCH picks the torch build installed first; the default is the CPU build that installs from local disk here.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
OUT   ?= results
ARGS  ?=

.PHONY: run test bench setup clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) main.py comprehensive --demo --out $(OUT) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_attribution.py $(ARGS)

clean:
	rm -rf $(VENV) $(OUT)
