# Two entry points, each doing its own set-up: `make train` (the main job) and `make test`.
# `make train` trains the CIFAR-10 MoE recipe (configs/cifar10_moe.yaml) on the JPEG CIFAR-10 copy when
# it is there (DATA), else on the official pickles (downloaded); a run already started is resumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

DATA   ?= ../shared/data/cifar10-jpeg
RUN    ?= runs/cifar10_moe-s0
ARGS   ?=

.PHONY: train demo test lint install

$(BIN)/visionmoe: pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,bench,stream,onnx]"
	touch $@

install: $(BIN)/visionmoe

train: install
	$(BIN)/visionmoe train --config cifar10_moe \
		$(if $(wildcard $(RUN)/checkpoint.pt),--resume) \
		$(if $(wildcard $(DATA)/train),data.dataset=imagefolder data.data_dir=$(DATA),data.download=true) $(ARGS)

demo: install
	$(BIN)/visionmoe demo

test: install
	$(BIN)/ruff check visionmoe tests
	$(BIN)/ruff format --check visionmoe tests
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check --fix visionmoe tests
	$(BIN)/ruff format visionmoe tests
