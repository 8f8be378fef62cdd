#!/usr/bin/env bash
# Checks that need CUDA (a few minutes on one GPU): the CUDA tests (they skip elsewhere), two
# processes over gloo, and the scale benchmark on the GPU, resident and with layer-by-layer offload.
#   PY=.venv/bin/python scripts/gpu_check.sh
set -euo pipefail
PY=${PY:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD}
$PY -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'; print(torch.cuda.get_device_name())"
$PY -m pytest -q -rs tests/test_scale.py tests/test_distributed.py
$PY benchmarks/scale.py --quick --device cuda --only mlp calibration
$PY benchmarks/scale.py --quick --device cuda --offload --only mlp
$PY benchmarks/scale.py --quick --device cuda --precision mixed --only mlp
