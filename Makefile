# Every target sets up .venv itself, so a fresh Debian machine with Python 3.11 needs nothing else
# for `make demo`. `make test` also needs the Debian tools the tests drive (coturn's client tools,
# chromium, nginx, ...): `.ci/run` installs them with apt first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NODE_STAMP := tests/e2e/node_modules/.installed

.PHONY: demo test test-slow lint format bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,demo,redis]'
	touch $(STAMP)

venv: $(STAMP)

$(NODE_STAMP): tests/e2e/package.json tests/e2e/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix tests/e2e
	touch $(NODE_STAMP)

demo: $(STAMP)
	$(BIN)/confedge demo

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP) $(NODE_STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/turn/run.py
	$(BIN)/python bench/proxy/run.py
	$(BIN)/python bench/guard/bench_check.py

clean:
	rm -rf $(VENV) tests/e2e/node_modules .pytest_cache .mypy_cache .ruff_cache
