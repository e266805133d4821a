# One command each, on a fresh machine with only Python 3.10+: make lab | make demo | make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: lab demo test lint docs chromium faults lessons bench bench-allreduce bench-data-parallel bench-ps bench-kernels bench-model-parallel bench-transformer bench-zero bench-parallel-transformer bench-long-context clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "minidist needs Python 3.10 or newer; set PYTHON=python3.x")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[lessons,dev,mpi,docs]'
	@touch $@

lab: $(STAMP)  ## open the lessons in JupyterLab
	$(BIN)/jupyter lab --notebook-dir=lessons $(ROOT_FLAG) lessons/00_welcome.ipynb

demo: $(STAMP)  ## the main job, from the terminal
	$(BIN)/python -m minidist tour

test: $(STAMP) lint chromium  ## every test, the lessons included, then the docs build
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest tests/cuda  # own process: CUDA simulator on unless there is a GPU
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env -p no:randomly lessons/
	$(MAKE) --no-print-directory docs

docs: $(STAMP)  ## the docs site into site/ (strict: any warning fails the build), MathJax included
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: it hides warnings from --strict

faults: $(STAMP)  ## run the fault tests, then write docs/faults.md from what they recorded
	$(BIN)/python -m pytest -m fault -p no:randomly tests
	$(BIN)/python tests/fault_matrix.py

lint: $(STAMP)
	$(BIN)/ruff check minidist tests

chromium:  ## Debian's chromium for the browser tests (apt-get as root; else they skip)
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium; }; } || echo "no /usr/bin/chromium: the browser tests skip"

$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@touch $@

bench-allreduce: $(VENV)/.bench  ## all-reduce vs MPICH, gloo and the memory-traffic limit
	$(BIN)/python benchmarks/allreduce.py

bench-data-parallel: $(VENV)/.bench  ## data_parallel vs PyTorch DDP (gloo), 1 and 2 workers
	$(BIN)/python benchmarks/data_parallel.py

bench-kernels: $(VENV)/.bench  ## CUDA kernels vs cuBLAS, PyTorch and a device copy (GPU)
	$(BIN)/python benchmarks/kernels.py

bench-ps: $(VENV)/.bench  ## parameter server vs a Queue server and torch RPC; BSP/ASP/SSP straggler
	$(BIN)/python benchmarks/parameter_server.py

bench-model-parallel: $(VENV)/.bench  ## tensor/pipeline/hybrid step time, bytes and measured bubble
	$(BIN)/python benchmarks/model_parallel.py

bench-transformer: $(VENV)/.bench  ## the GPT's training step vs PyTorch eager on CPU, same weights and loss
	$(BIN)/python benchmarks/transformer.py

bench-zero: $(VENV)/.bench  ## ZeRO-1/2/3 and DDP overlap on 2 ranks vs DDP, ZeroRedundancyOptimizer, FSDP
	$(BIN)/python benchmarks/zero.py

bench-parallel-transformer: $(VENV)/.bench  ## Megatron TP/SP and interleaved 1F1B on the GPT vs PyTorch TP (gloo)
	$(BIN)/python benchmarks/parallel_transformer.py

bench-long-context: $(VENV)/.bench  ## all_to_all vs MPICH and gloo; context and expert parallelism on the GPT
	$(BIN)/python benchmarks/long_context.py

bench: bench-allreduce bench-data-parallel bench-kernels bench-ps bench-model-parallel bench-transformer bench-zero bench-parallel-transformer bench-long-context  ## every benchmark; results in benchmarks/results/

lessons: $(STAMP)  ## re-execute every lesson in place (commit them executed)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace lessons/*.ipynb

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build site *.egg-info
