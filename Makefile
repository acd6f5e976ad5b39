# The two commands of the README: `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/bastion policy test examples/gitclub.polar examples/folders.polar examples/agents.polar
	$(BIN)/bastion policy explain examples/gitclub.polar --facts examples/gitclub.facts User:alice read Repo:anvil

test: $(STAMP)
	$(BIN)/ruff check bastion tests benchmarks
	$(BIN)/ruff format --check bastion tests benchmarks
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check bastion tests benchmarks
	$(BIN)/ruff format --check bastion tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format bastion tests benchmarks
	$(BIN)/ruff check --fix bastion tests benchmarks

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/policy_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
