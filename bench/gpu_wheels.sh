#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.py installs on the lent GPU machine (--wheels .whl), which has
# torch 2.11, transformers 5.17 and no package index. Run here, in the repository root, before the call:
#
#     echo /.whl/ >> .git/info/exclude    # once: the wheels travel with the call, never into a commit
#     bash bench/gpu_wheels.sh            # -> .whl/, about 16 MB (the call may carry 64 MiB in all)
#
# Arguments: [DEST] [PYTHON_VERSION] (defaults .whl and 3.12, the machine's python3). What and why:
#   transformers 5.20.2   05 needs 5.20 (mm_encoder_outputs); its needs that the machine lacks or has too old:
#   regex, tqdm           (transformers checks regex>=2025.10.22 when imported; the machine's is unknown)
#   math-verify 0.9.0, latex2sympy2_extended 1.11.0, antlr4-python3-runtime 4.13.2   (rewards.py)
#   trl 1.16.0, datasets 5.2.0, dill, multiprocess   (optional: the TRL column; accelerate, pyarrow,
#                         pandas and torchvision are on the machine)
set -euo pipefail
dest=${1:-.whl}
py=${2:-3.12}
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" \
    transformers==5.20.2 regex==2026.11.19 tqdm==4.70.1 \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l "$dest"
du -sh "$dest"
