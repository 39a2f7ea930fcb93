#!/usr/bin/env bash
# The GPU checks in one command, for the first machine with a CUDA device (about 5 minutes on one
# H100/H200): the compiled Triton kernels against their torch references and their first-use checks
# (tests/test_gpu.py), a training step on the GPU, then the kernel benchmark on CUDA and the memory
# benchmark. Paste its output into docs/kernels.md with the date and the machine.
#
#     bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
# compiled kernels: tests/conftest.py only sets the interpreter (and the torch backend) when these are unset
export TRITON_INTERPRET=0 LOCALIZE_KERNEL_BACKEND=
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py
timeout 120 python benchmarks/kernels.py --device cuda --repeats 20
timeout 90 python benchmarks/memory_speed.py --steps 5
