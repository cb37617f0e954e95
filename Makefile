# The two commands a newcomer needs: `make demo` and `make test`.
# Everything else is installed from this repository's own files, idempotently.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NODE   ?= node

.PHONY: setup postgres demo test test-cpython test-mpy test-mpy-unix check-firmware bench soak vectors clean

setup: $(VENV)/.stamp-install node_modules/.stamp-install

$(VENV)/.stamp-install: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

node_modules/.stamp-install: package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

# The PostgreSQL server the tests start in a temporary directory (tests/conftest.py):
# Debian's package, installed only when no initdb is found (needs root; a no-op otherwise).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; }

demo: setup
	$(PY) tools/demo.py

# pytest last, so its summary closes the run (it holds the heap budget on the unix port).
test: setup postgres check-firmware test-mpy test-mpy-unix test-cpython

test-cpython: setup postgres
	$(PY) -m pytest

# The dual-VM suite (tests/protocol, tests/firmware) inside the wasm VM (the virtual
# board's) and on the unix port (a real collector in a fixed heap).
test-mpy: setup
	$(NODE) tools/mpy_test.mjs

test-mpy-unix: setup
	$(PY) tools/mpy_unix_test.py

# Firmware (firmware/, protocol/) against MicroPython 1.27 stubs: CPython-only APIs fail.
# Installs pinned pyright and stubs into .stubs/ on first use (tools/firmware_check/).
check-firmware: setup
	$(PY) tools/check_firmware.py

vectors: setup
	$(PY) protocol/vectors/make_vectors.py

# Benchmarks (scripts, not tests): figures for the README.
bench: setup
	$(PY) tests/bench/bench_ed25519.py
	$(PY) tests/bench/bench_x25519.py
	$(PY) tests/bench/bench_apply.py
	$(PY) tests/bench/bench_heap.py --baseline 75f0c6f
	$(PY) tests/bench/bench_wear.py
	$(PY) tests/bench/bench_issue.py
	$(PY) tests/bench/bench_codes.py
	$(PY) tests/bench/bench_reconcile.py
	$(PY) tests/bench/bench_rig.py
	$(PY) tests/bench/bench_ppmid.py
	$(PY) tests/bench/bench_serve.py

# Long property runs with bounded defaults: SOAK=20 multiplies every example count.
SOAK ?= 20
soak: setup
	TOPUP_SOAK=$(SOAK) $(PY) -m pytest -q tests/test_fuzz_decoders.py \
		tests/test_ledger_workload.py tests/test_store_powercut.py tests/test_ed25519_differential.py \
		tests/hil/test_model.py

clean:
	rm -rf $(VENV) node_modules .stubs .pytest_cache .hypothesis
