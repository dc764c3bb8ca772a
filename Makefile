# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv from the requirements (first use) and trains on the embedded digits
#   make test    creates .venv from the requirements (first use) and runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test test-quick bench venv

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

venv: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) train.py

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test-quick: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) bench/ema_update.py
	$(PY) bench/train_overhead.py
