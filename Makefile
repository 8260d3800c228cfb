# Two commands matter: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two pytest-xdist workers, each taking whole files, the timed ones alone at the
# end (tests/conftest.py); PYTEST_FLAGS='-n 0' runs them in one process.
PYTEST_FLAGS ?= -n 2
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck pytest system-deps bench lock clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { sh scripts/ensure-venv-support.sh && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

demo: $(STAMP)
	$(BIN)/changeover demo

# Real Apache httpd, HAProxy, nginx, OpenSSH and PostgreSQL for the tests (Debian, root).
system-deps:
	sh scripts/install-system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q -ra $(PYTEST_FLAGS)

test: system-deps lint typecheck pytest

bench: $(STAMP) system-deps
	$(BIN)/python -m benchmarks

# Re-pin every dependency after editing pyproject.toml.
lock:
	rm -rf /tmp/changeover-lock && $(PYTHON) -m venv /tmp/changeover-lock
	/tmp/changeover-lock/bin/pip install -q -e '.[dev]'
	/tmp/changeover-lock/bin/pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
