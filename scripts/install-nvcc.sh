#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into a venv, for building the CUDA kernels on a machine without
# the CUDA toolkit (CI, dev boxes). Idempotent: a venv whose nvcc already runs is left alone.
# The last line printed is the nvcc path, so:
#
#     export NVCC=$(scripts/install-nvcc.sh | tail -1)
#
# Venv: $RFT_NVCC_VENV (default ~/.cache/rft-nvcc). Python: $PYTHON (default python3).
# Pins as in ../shared/GPU.md: nvcc 13.0 matches the GPU machine's driver (CUDA 13.0); the cccl
# package provides nv/target, which cuda_bf16.h needs.
set -euo pipefail

venv="${RFT_NVCC_VENV:-$HOME/.cache/rft-nvcc}"
python="${PYTHON:-python3}"
pins=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-crt==13.0.*"
    "nvidia-nvvm==13.0.*"
    "nvidia-cuda-cccl==13.0.*"
)

find_nvcc() {
    # site-packages/nvidia/cu13/bin/nvcc, whatever the venv's python version is
    compgen -G "$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" | head -1 || true
}

nvcc="$(find_nvcc)"
if [[ -n "$nvcc" ]] && "$nvcc" --version 2>/dev/null | grep -q "release 13.0" \
    && compgen -G "$venv/lib/python3*/site-packages/nvidia/cu13/include/cccl/nv/target" >/dev/null; then
    echo "nvcc already installed in $venv" >&2
else
    echo "installing nvcc 13.0 (PyPI) into $venv" >&2
    if [[ ! -x "$venv/bin/pip" ]]; then
        "$python" -m venv "$venv" >&2
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}" >&2
    nvcc="$(find_nvcc)"
    if [[ -z "$nvcc" ]]; then
        echo "error: pip finished but no nvcc under $venv/lib/python3*/site-packages/nvidia/cu13/bin" >&2
        exit 1
    fi
    "$nvcc" --version >&2
fi
echo "$nvcc"
