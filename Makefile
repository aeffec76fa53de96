# Two commands matter: `make demo` and `make test`. Each sets up what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test lint unit bench weaviate docs web clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP)
	$(BIN)/python scripts/weaviate.py install
	bash scripts/system-deps.sh

demo: $(STAMP)
	$(BIN)/python demos/lan_merge.py

lint: $(STAMP)
	$(BIN)/ruff check unity_crdt tests bench demos scripts
	$(BIN)/ruff format --check unity_crdt tests bench demos scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/pytest -p no:cacheprovider -q -ra

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# The browser page (demos/web): yjs + y-websocket bundled from the locked npm packages.
web:
	cd demos/web && npm ci --no-audit --no-fund && npm run build

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .weaviate build *.egg-info
