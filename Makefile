# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds this machine class holds on local disk.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint bench clean

$(BIN)/trakview: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/trakview

install: $(BIN)/trakview

demo: install
	$(BIN)/trakview demo --out demo-run

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/bench_demo.py

clean:
	rm -rf $(VENV) demo-run
