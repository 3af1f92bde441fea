#!/usr/bin/env bash
# The venv `make test-vllm` runs in: vLLM's CPU build (pinned in requirements.txt beside this file) and the
# project, editable. About 6 GB; about 4 minutes on a fresh machine. Safe to run again: pip skips what is there.
#
#   bash tests/vllm_cpu/install.sh [VENV]      (default .venv-vllm)
set -euo pipefail
venv=${1:-.venv-vllm}
pins="$(dirname "$0")/requirements.txt"
# A machine-wide pip configuration may offer local wheels (a torch+cpu build, say) that pip would prefer
# to the pinned ones: this venv reads PyPI only.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_CONSTRAINT PIP_EXTRA_INDEX_URL
test -x "$venv/bin/python" || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --no-deps -r "$pins"
# the project itself, editable; a dependency it gains later than this list is resolved within the pins
"$venv/bin/python" -m pip install -q -c "$pins" --no-build-isolation -e ".[dev,lora]"
"$venv/bin/python" -c "import torch, torchvision.ops, vllm, transformers; print('vllm', vllm.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)"
