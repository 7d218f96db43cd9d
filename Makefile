# Two commands do all set-up on a fresh machine:  make demo  /  make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/specdiff: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/specdiff

demo: install
	$(BIN)/specdiff generate --compare --num-images 4 --batch-size 4 --steps 1000 --out outputs/demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m specdiff.workbench.bench

clean:
	rm -rf $(VENV) build *.egg-info
