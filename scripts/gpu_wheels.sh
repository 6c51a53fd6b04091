#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels the GPU machine (Python 3.12, jax 0.11.2, no network)
# may lack, into the git-ignored .whl/; scripts/gpu_first_run.sh installs each one whose module does not import there.
#   flax 0.12.12          flax 0.12.8 (CI's) does not import with jax 0.11.x; flax >= 0.12.9 needs jax >= 0.11.1
#   tokamax 0.0.12 + deps its Mosaic GPU flash attention (jsft's `tokamax` attention); pure-Python wheels
# --python-version 3.12: these flax wheels say Requires-Python >= 3.12, so pip on 3.11 would not find them otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d .whl \
  flax==0.12.12 tokamax==0.0.12 qwix==0.1.8 jaxtyping==0.3.11 typeguard==2.13.3 einshape==1.0 immutabledict==4.3.1 \
  wadler-lindig==0.1.8 annotated-types==0.8.0 typing-inspection==0.4.5 pydantic==2.14.4
# pydantic's compiled core (tokamax needs pydantic): the GPU machine's platform
$PY -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_17_x86_64 -d .whl \
  pydantic-core==2.50.5
ls -l .whl
