# ferry — the two commands the README promises: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint unit demo bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check agent vmruntime proto tests bench
	$(BIN)/mypy agent vmruntime proto

test: $(STAMP) lint
	$(BIN)/pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m agent.demo

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'  # py-spy and matplotlib (the plots)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
