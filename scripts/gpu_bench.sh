#!/bin/sh
# Install the GPU benchmark's bundle (wheels-gpu/, made by `make wheels-gpu`) for this
# machine's own Python, offline, then run the benchmark; arguments go to `python -m bench.gpu`.
#   PYTHON=python3 sh scripts/gpu_bench.sh --parts model
# SF_GPU_BUNDLED=1 uses the bundled libopus and redis-server even where the machine has its own.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
ENV_DIR="${SF_GPU_ENV:-${TMPDIR:-/tmp}/speechfront-gpu}"
if [ ! -f wheels-gpu/manifest.json ]; then
    echo "wheels-gpu/ is missing: run 'make wheels-gpu' where PyPI is reachable, then carry it here" >&2
    exit 2
fi
"$PY" scripts/gpu_bundle.py install --into "$ENV_DIR" ${SF_GPU_BUNDLED:+--bundled}
. "$ENV_DIR/env.sh"
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu "$@"
