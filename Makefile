# Two commands on a fresh machine: `make demo` runs the product, `make test` runs the tests.
# Each bootstraps .venv from this repository's own files first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo run test lint bench screenshot clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,speed,embedded,dramatiq,celery,rq]"
	touch $@

demo run: $(BIN)/.installed
	$(BIN)/relay demo

lint: $(BIN)/.installed
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/emit.py

# refresh the README's screenshot with the browser test (needs /usr/bin/chromium)
screenshot: $(BIN)/.installed
	DEMO_SCREENSHOT=docs/demo.png $(BIN)/pytest -q -rs -p no:cacheprovider tests/test_browser.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
