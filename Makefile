# Two entry points, each doing its own set-up: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint install

$(BIN)/visionmoe: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

install: $(BIN)/visionmoe

demo: install
	$(BIN)/visionmoe demo

test: install
	$(BIN)/ruff check visionmoe tests
	$(BIN)/ruff format --check visionmoe tests
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check --fix visionmoe tests
	$(BIN)/ruff format visionmoe tests
