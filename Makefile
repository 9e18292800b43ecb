# Two commands: `make run` serves the default config; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	$(BIN)/shiphook serve

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every benchmark of bench/README.md, on this machine; results go to bench/results/.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	cd bench && for b in accept reject dispatch burst waiters memory; do ../$(BIN)/python $$b.py || exit 1; done
	$(BIN)/python bench/plot.py

lint: install
	$(BIN)/ruff check core plugins tests bench
	$(BIN)/ruff format --check core plugins tests bench

clean:
	rm -rf $(VENV) shiphook.db shiphook.db-* shiphook.lock
