# omnienc: the two quick-start commands are `make demo` and `make test`.
# The venv is .venv in the repo root; CONSTRAINTS pins every package for reproducible CI.
# GPU users: see README "Installing on a GPU machine" (install your CUDA torch first, then
# `make install CONSTRAINTS=constraints-gpu.txt` or plain `pip install -e .`).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.omnienc-installed
DATA ?= $(or $(OMNIENC_DATA),../shared/data)
RUN ?= runs/demo

.PHONY: install demo test test-slow lint clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(PY) -c "import torch, torchvision, monai, timm, lightly, medmnist; print('installed: torch', torch.__version__, '| cuda available:', torch.cuda.is_available())"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/omnienc info $(DATA)/volumes/totalsegmentator -q
	$(VENV)/bin/omnienc embed --random resconv_small --data $(DATA) \
		medmnist:adrenalmnist3d:28:test $(DATA)/volumes -o $(RUN)/features_random.npz -q

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
