# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# `run` installs the runtime dependencies only; `test`, `lint`, `mypy` and `bench` add the dev
# extras (pytest, ruff, mypy, moto). Both stamps are redone when pyproject.toml changes.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
CONFIG ?= config.json
PYTEST_ARGS ?=

.PHONY: install install-dev run test lint mypy bench clean libmagic

$(STAMP): pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	@$(PY) -c "import magic" 2>/dev/null || $(MAKE) --no-print-directory libmagic
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

# python-magic needs the C library libmagic; install it where we can, else say how.
libmagic:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq libmagic1 >/dev/null; \
	else \
	  echo "python-magic needs libmagic: apt-get install libmagic1 (Debian/Ubuntu) or brew install libmagic (macOS)"; exit 1; \
	fi

install: $(STAMP)

install-dev: $(DEV_STAMP)

run: install
	$(VENV)/bin/downloader run -c $(CONFIG)

# pytest exits 5 when it collected no test: that is a failure here, never a pass.
test: install-dev
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: install-dev
	$(VENV)/bin/ruff check downloader tests bench harness
	$(VENV)/bin/ruff format --check downloader tests bench harness

mypy: install-dev
	$(VENV)/bin/mypy

bench: install-dev
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
