#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU (a few minutes): the CUDA tests, then the CIFAR ResNet-110 table
# (seconds per image at n = 100,000 in float32 / bfloat16 / channels_last / compiled, and the ratio of certify's
# throughput to the raw forward's). Needs torch, scipy and statsmodels there; nothing is installed.
#   bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
out=${1:-gpu-output}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_exactness.py 2>&1 | tee "$out/cuda-tests.txt"
python3 benchmarks/throughput.py --device cuda --resnet --n 100000 --rounds 2 --compile 2>&1 | tee "$out/resnet.txt"
