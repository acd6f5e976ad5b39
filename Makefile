# The two commands of the README: `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run run-oidc test lint format bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/bastion policy test examples/gitclub.polar
	$(BIN)/bastion policy test examples/folders.polar
	$(BIN)/bastion policy test examples/agents.polar
	$(BIN)/bastion policy test examples/quickstart/policy.polar
	$(BIN)/python examples/quickstart/setup.py .quickstart/bastion.db
	$(BIN)/bastion serve --config examples/quickstart/bastion.toml

# The quickstart with people logging in through a test OpenID provider (oidc-provider, installed
# with npm into .npm-oidc-provider/ and run with Node on 127.0.0.1:9400) instead of passwords.
run-oidc: $(STAMP)
	$(BIN)/python examples/quickstart/setup.py .quickstart/bastion.db
	cat examples/quickstart/bastion.toml examples/quickstart/identity.toml > .quickstart/bastion-oidc.toml
	$(BIN)/python -m tests.identity.oidc_provider & trap "kill $$!" EXIT INT TERM; \
		QUICKSTART_OIDC_SECRET=quickstart-oidc-secret $(BIN)/bastion serve --config .quickstart/bastion-oidc.toml

# The tests start many Python processes (bastion serve, the CLI, test programs): compiled
# once here, each reads bastion's bytecode instead of compiling it again, which costs nearly a
# second of CPU per process where PYTHONDONTWRITEBYTECODE is set (Python then writes no cache).
# Three processes on two cores: a third of the suite's time is spent waiting (servers starting,
# deadlines, sleeps), which a third process fills (README, "Tests").
test: $(STAMP)
	$(BIN)/ruff check bastion tests benchmarks
	$(BIN)/ruff format --check bastion tests benchmarks
	$(BIN)/python -m compileall -q bastion tests benchmarks
	$(BIN)/pytest -q -n 3 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check bastion tests benchmarks
	$(BIN)/ruff format --check bastion tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format bastion tests benchmarks
	$(BIN)/ruff check --fix bastion tests benchmarks

# The peers have their own environment: oso 0.27.3 pins an older cffi than the runtime wants.
BENCH := .venv-bench
$(BENCH)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/pip install --quiet --upgrade pip
	$(BENCH)/bin/pip install --quiet -e '.[bench]'
	@touch $(BENCH)/.installed

bench: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/policy_bench.py

clean:
	rm -rf $(VENV) $(BENCH) .pytest_cache .ruff_cache
