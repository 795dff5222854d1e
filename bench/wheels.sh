#!/usr/bin/env bash
# Build into ./.whl/ the pure-Python wheels that a GPU machine without network access lacks (its image has torch, not
# omegaconf). Run here, where pip can reach an index; copy the repository with .whl/ to the GPU machine; bench/gpu_check.sh
# installs them from there. Extra arguments go to pip (e.g. --index-url URL).
#   bash bench/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip wheel -q --no-deps -w .whl "$@" omegaconf==2.4.0 antlr4-python3-runtime==4.9.3
ls .whl
