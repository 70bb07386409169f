# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint types unit venv clean bench fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/broadcast-gateway demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check gateway channels tests
	$(BIN)/ruff format --check gateway channels tests

types: $(STAMP)
	$(BIN)/mypy

# two workers: CI machines have two cores; each worker starts its own broker (PYTEST_ARGS="-n 0": one).
# loadgroup: a module marked xdist_group (one gateway for the module, tests in order) stays on one worker
PYTEST_ARGS ?= -n 2 --dist loadgroup
unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# The whole suite: lint, types, tests. CI runs exactly this (.ci/run).
test: lint types unit

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

# Coverage-guided fuzzing (atheris) of intake, receipt webhooks, SMPP receipts and recipient files,
# FUZZ_SECONDS each; not part of `make test`. A crash leaves its input in var/fuzz/<target>/.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/pip install --quiet atheris
	for t in intake receipts smpp recipients; do \
	  mkdir -p var/fuzz/$$t/corpus && \
	  $(BIN)/python -m tests.fuzz.targets $$t var/fuzz/$$t/corpus -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=var/fuzz/$$t/ -rss_limit_mb=4096 || exit 1; \
	done
