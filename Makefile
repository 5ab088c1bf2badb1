# Every target sets up .venv itself, so a fresh Debian machine with Python 3.11 needs nothing else
# for `make demo`. `make test` also needs the Debian tools the tests drive (coturn's client tools,
# chromium, nginx, ...): `.ci/run` installs them with apt first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NODE_STAMP := tests/e2e/node_modules/.installed

NATIVE := build/native
# The native TURN data plane and the HTTP/2 engine on libnghttp2, built in place for the
# editable install (setup.py), when a C compiler (and libnghttp2-dev) is there; without them TURN
# runs on the pure-Python data plane and HTTP/2 on hyper-h2.
NATIVE_EXT := $(VENV)/.native-ext
# The suites that run again against the compiled build (the modules setup.py compiles and what
# drives them end to end), the TURN suites there on the native data plane.
# Not here: test_ops_reload_workers.py (34 s), the workers' certificate reload: runtime.py,
# proxy/service.py and tls/ are not compiled, so it runs once, in test-pure.
NATIVE_TESTS := tests/unit/test_build.py tests/unit/test_proxy_*.py tests/unit/exchange \
	tests/integration/test_proxy_*.py tests/integration/test_guard_proxy.py \
	tests/integration/test_qa_guard_evasion.py \
	tests/integration/test_admin_*.py tests/integration/test_demo.py \
	tests/integration/test_run_reload.py tests/integration/test_ops_drain.py \
	tests/integration/test_ops_metrics.py tests/integration/test_ops_reload.py \
	tests/e2e/test_proxy_*.py tests/e2e/test_demo_call.py \
	tests/integration/test_turns_shared_port.py tests/e2e/test_turns_on_https_port.py \
	tests/unit/test_turn_*.py tests/unit/test_stun_*.py tests/unit/test_qa_turn.py tests/integration/test_turn_*.py \
	tests/integration/test_qa_turn_hostile.py tests/integration/test_qa_turn_auth.py \
	tests/integration/test_guard_turn.py \
	tests/e2e/test_turn_*.py tests/e2e/test_webapp_h2.py

.PHONY: demo test test-pure test-native test-slow lint format bench venv native clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CONFEDGE_PURE=1 $(BIN)/pip install --quiet -e '.[dev,demo,redis]'
	touch $(STAMP)

$(NATIVE_EXT): src/confedge/turn/_native.c src/confedge/proxy/_h2native.c \
		src/confedge/proxy/_h1native.c \
		src/confedge/turn/bpf/relay.bpf.c setup.py | $(STAMP)
	@if command -v $${CC:-cc} >/dev/null 2>&1; then \
		$(BIN)/python setup.py -q build_ext --inplace || true; \
	else \
		echo "confedge: no C compiler: TURN will use the pure-Python data plane, HTTP/2 hyper-h2, HTTP/1.1 httptools alone"; \
	fi
	touch $(NATIVE_EXT)

venv: $(STAMP) $(NATIVE_EXT)

$(NODE_STAMP): tests/e2e/package.json tests/e2e/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix tests/e2e
	touch $(NODE_STAMP)

# DEMO_ARGS: more options for `confedge demo`, e.g. make demo DEMO_ARGS="--port-base 20000".
DEMO_ARGS ?=
demo: $(STAMP) $(NATIVE_EXT)
	$(BIN)/confedge demo $(DEMO_ARGS)

# The compiled build as a wheel install makes it (setup.py), into $(NATIVE): put first on
# PYTHONPATH, it replaces the editable install's interpreted modules.
native: $(STAMP)
	# build/lib.*: setuptools' staging area; a module dropped from the compiled list would
	# otherwise come back from it as a stale .so.
	rm -rf $(NATIVE) build/lib.*
	$(BIN)/pip install --quiet --no-build-isolation --no-deps --target $(NATIVE) .

# Every suite on the interpreted source (TURN on the pure-Python data plane), then the proxy's
# suites on the compiled build and the TURN suites on the native data plane.
test: test-pure test-native

# Two pytest workers (pytest-xdist), a test file each at a time: most tests wait on real peers,
# timers and subprocesses (the load average stays near 0.5 on one worker), so two halve the
# wall time on a 2-core machine without starving the timing tests. PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)
# The slowest tests of each run, so a CI log shows where the 15-minute budget goes.
DURATIONS ?= --durations=15

test-pure: $(STAMP) $(NATIVE_EXT) $(NODE_STAMP)
	CONFEDGE_DATAPLANE=python CONFEDGE_H2_ENGINE=python CONFEDGE_H1_ENGINE=python $(BIN)/pytest -q $(XDIST) $(DURATIONS)

test-native: native $(NODE_STAMP)
	CONFEDGE_EXPECT_BUILD=compiled CONFEDGE_DATAPLANE=native CONFEDGE_H2_ENGINE=native \
		CONFEDGE_H1_ENGINE=native PYTHONPATH=$(NATIVE) \
		$(BIN)/pytest -q $(XDIST) $(DURATIONS) $(NATIVE_TESTS)

test-slow: $(STAMP) $(NODE_STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/shellcheck install.sh .ci/run

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/turn/run.py
	$(BIN)/python bench/proxy/run.py
	$(BIN)/python bench/guard/bench_check.py

clean:
	rm -rf $(VENV) build tests/e2e/node_modules .pytest_cache .mypy_cache .ruff_cache
