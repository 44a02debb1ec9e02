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

# Air-gapped GPU machines (README "Installing on a GPU machine without internet").
# On a machine with internet (same OS, CPU architecture and Python minor version as the cluster):
# `make wheelhouse` puts a wheel of every package omnienc's install needs into $(WHEELS), pinned
# by $(CONSTRAINTS), except torch, torchvision, triton and the nvidia-*/cuda-* packages (the
# user's CUDA torch brings those); sdist-only packages are built into wheels. EXTRAS=dev adds
# the test and lint tools. On the cluster, after installing a CUDA torch into $(VENV):
# `make install-offline WHEELS=DIR` installs omnienc from DIR only (pip --no-index).
WHEELS ?= wheelhouse
EXTRAS ?=
WHEEL_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: wheelhouse install-offline

wheelhouse:
	$(WHEEL_PY) .ci/wheelhouse.py --out $(WHEELS) --constraints $(CONSTRAINTS) --extras "$(EXTRAS)"
	$(WHEEL_PY) -m pip wheel -q --no-deps -w $(WHEELS) -r $(WHEELS)/requirements.txt
	@echo "wheelhouse: $$(ls $(WHEELS)/*.whl | wc -l) wheels, $$(du -sh $(WHEELS) | cut -f1), in $(WHEELS)"

install-offline:
	@test -d "$(WHEELS)" || { echo "install-offline: wheel folder '$(WHEELS)' does not exist; build it with 'make wheelhouse WHEELS=$(WHEELS)' on a machine with internet and copy it here, or pass WHEELS=DIR" >&2; exit 2; }
	@test -f "$(WHEELS)/constraints.txt" || { echo "install-offline: '$(WHEELS)' has no constraints.txt: it was not made by 'make wheelhouse'" >&2; exit 2; }
	@$(PY) -c "import torch, torchvision" || { echo "install-offline: $(PY) cannot import torch and torchvision; create $(VENV) and install your CUDA torch into it first (README)" >&2; exit 2; }
	$(PY) -m pip install --no-index --find-links $(WHEELS) -c $(WHEELS)/constraints.txt -e ".$(if $(EXTRAS),[$(EXTRAS)])" \
		|| { echo "install-offline: pip could not install from '$(WHEELS)' alone (see above: a wheel missing, or built for another Python or platform); rebuild it with 'make wheelhouse' on a machine with internet" >&2; exit 1; }
	$(PY) -c "import torch, torchvision, monai, timm, lightly, medmnist; print('installed offline: torch', torch.__version__, '| cuda available:', torch.cuda.is_available())"
	touch $(STAMP)
