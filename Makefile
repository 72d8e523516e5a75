# Quick start: `make demo` then `make test` (Python 3.11).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install test test-fast lint demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,export]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) train.py --config configs/demo.py --workdir $(DEMO_DIR)
	$(PY) eval.py --config configs/demo.py --checkpoint $(DEMO_DIR) --output_dir $(DEMO_DIR)/eval

clean:
	rm -rf $(VENV) runs .pytest_cache
