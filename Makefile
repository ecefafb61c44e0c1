# ferry — the two commands the README promises: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-all lint unit demo bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check agent vmruntime proto tests bench
	$(BIN)/mypy agent vmruntime proto tests/test_migration_sessions.py

test: $(STAMP) lint
	$(BIN)/pytest -q -m "not slow" tests

# The slow tests too (pyproject.toml's `slow` marker).
test-all: $(STAMP) lint
	$(BIN)/pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m agent.demo

# QEMU's pre-copy and iperf3 are baselines of the data-path bench: installed when missing and
# possible (root with apt-get); otherwise the bench reports them as skipped. Never fails `make bench`.
BENCH_DEBS := qemu-system-x86 iperf3
APT := DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0 install --no-install-recommends

bench: $(STAMP)
	-@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v iperf3 >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "bench: installing $(BENCH_DEBS) (baselines)"; \
	    $(APT) $(BENCH_DEBS) >/dev/null 2>&1 \
	      || { apt-get -q update >/dev/null 2>&1 && $(APT) $(BENCH_DEBS) >/dev/null 2>&1; } \
	      || echo "bench: installing $(BENCH_DEBS) failed: QEMU/iperf3 baselines skipped"; \
	  else \
	    echo "bench: qemu-system-x86_64 or iperf3 missing (not root with apt-get): their baselines skipped"; \
	  fi; \
	fi
	$(BIN)/pip install -q -e '.[test,bench]'  # py-spy and matplotlib (the plots)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
