#!/usr/bin/env bash
# Set-up and entry points. Every command first creates or reuses .venv.
#   ./run.sh train [flags]   train the seed's CIFAR-10 CNN (configs/cifar_cnn.py)
#   ./run.sh test [args]     the whole test suite (pytest args pass through)
#   ./run.sh bench [flags]   LeNet step speed next to PyTorch (research.bench)
#   ./run.sh lint            ruff, then the layers and no import cycles (lint-imports)
#   ./run.sh setup           only create/update .venv
# $PYTHON picks the interpreter; by default the newest of 3.12/3.13 found
# (jax 0.12 needs >= 3.12; on 3.11 pip silently resolves jax 0.10), else python3.
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local v candidate
  for v in 3.12 3.13; do
    for candidate in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
      if "$candidate" -c 'import sys' >/dev/null 2>&1; then echo "$candidate"; return; fi
    done
  done
  echo python3
}

setup() {
  local stamp=.venv/.installed
  local want files
  # Reinstall when the dependencies or the C++ kernels (optional) change.
  shopt -s nullglob
  files=(setup.cfg pyproject.toml setup.py research/kernels/*.cc research/kernels/*.h)
  shopt -u nullglob
  want=$(cat "${files[@]}" | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  if [ ! -x .venv/bin/python ]; then
    local py
    py=$(find_python)
    echo "run.sh: creating .venv with $py ($("$py" --version 2>&1))" >&2
    "$py" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
}

# PyTorch for the benchmark, in its own venv: the CPU build of torch on this
# project's machines is for Python 3.11 (and JAX never shares a process with it).
setup_torch() {
  if [ -x .venv-torch/bin/python ] && .venv-torch/bin/python -c 'import torch' 2>/dev/null; then
    return
  fi
  local py=${TORCH_BASE_PYTHON:-python3.11}
  command -v "$py" >/dev/null || py=python3
  local spec
  spec=$("$py" -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg"); print(" ".join(c["options.extras_require"]["bench"].split()))')
  echo "run.sh: creating .venv-torch with $py ($spec)" >&2
  "$py" -m venv .venv-torch
  .venv-torch/bin/python -m pip install -q $spec numpy
}

# The prepared datasets of this project's machines, unless told otherwise.
if [ -z "${TFDS_DATA_DIR:-}" ] && [ -d ../shared/tensorflow_datasets ]; then
  export TFDS_DATA_DIR="$PWD/../shared/tensorflow_datasets"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  train) setup; exec .venv/bin/python -m research.main --config=configs/cifar_cnn.py "$@" ;;
  test) setup; exec .venv/bin/python -m pytest "$@" ;;
  lint) setup; .venv/bin/ruff check research tests configs
        exec .venv/bin/lint-imports "$@" ;;
  bench) setup; setup_torch
         exec .venv/bin/python -m research.bench --config=configs/cifar_cnn.py "$@" ;;
  *) echo "usage: ./run.sh {train|test|bench|lint|setup} [args]" >&2; exit 2 ;;
esac
