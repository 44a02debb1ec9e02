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

# Pretrain on every volume in $(DATA)/volumes with the quick CPU recipe (a few minutes; a
# second `make demo` resumes the finished run and only probes), then probe the frozen encoder
# on AdrenalMNIST3D beside a random-init encoder of the same shape.
demo: $(STAMP)
	$(VENV)/bin/omnienc pretrain --config configs/cpu-quick.yaml --data_root $(DATA) \
		--run_dir $(RUN) --trainer.enable_progress_bar false
	$(VENV)/bin/omnienc probe $(RUN)/encoder --dataset adrenalmnist3d --size 28 --data $(DATA) -q

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
