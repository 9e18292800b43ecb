# Two commands: `make run` serves the default config; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# every built-in backend is its own distribution, installed as a third party's would be; so is
# the example plugin, which the tests run the conformance suite on
PLUGINS := $(wildcard plugins/*/pyproject.toml examples/*/pyproject.toml)

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -rf shiphook.egg-info  # metadata of the old layout, which still registered swarm in the core
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $(STAMP)

run: install
	$(BIN)/shiphook serve

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every benchmark of bench/README.md, on this machine; results go to bench/results/.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	cd bench && for b in accept reject dispatch burst waiters memory stop; do ../$(BIN)/python $$b.py || exit 1; done
	$(BIN)/python bench/plot.py

lint: install
	$(BIN)/ruff check core plugins examples tests bench
	$(BIN)/ruff format --check core plugins examples tests bench

clean:
	rm -rf $(VENV) shiphook.db shiphook.db-* shiphook.lock shiphook.egg-info
