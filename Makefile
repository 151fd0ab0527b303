# `make up` and `make test` each create or refresh .venv themselves (Python 3.11 + make is all you need).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test unit bench chaos sim clean

# `make test` runs the suite on TEST_WORKERS pytest-xdist workers; most tests wait on servers and
# subprocesses rather than compute, so more workers than cores pays (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 4

$(BIN)/python:
	@test -n "$(PY)" || { echo "make: no python3.11 or python3 on PATH (set PY=/path/to/python3.11)"; exit 2; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: $(PY) is older than Python 3.11"; exit 2; }
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,map]'
	@touch $(STAMP)

up: $(STAMP)
	$(BIN)/cpn up

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup -m "not serial"
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider -m serial

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/cpn bench all

chaos: $(STAMP)
	$(BIN)/cpn chaos

sim: $(STAMP)
	$(BIN)/cpn sim --out report/

clean:
	rm -rf $(VENV) .cpn report .pytest_cache
