#!/usr/bin/env bash
# GPU check and timings for star-jax: correctness against float64 references, then the STAR loss
# and the full train step (batch 32/64/128, float32 and bfloat16). Run from the repository root:
#
#   bash benchmarks/gpu.sh [--record] [--process_settings tuned|default]
#
# Arguments go to `python -m benchmarks.gpu_check` (`--help` lists them and does nothing else;
# `--record` appends the summary to benchmarks/RESULTS.md).
#
# Needs a Python with JAX (CUDA), flax, optax, numpy; torch (CUDA) is optional (official-loss
# comparison). No network, no TensorFlow, no install of the project: the repository goes on
# PYTHONPATH. Pure-Python packages missing there can be shipped as wheels in `.whl/`.
# Environment: PYTHON (default python3); OUT (also write $OUT/gpu_results.md);
# GPU_CHECK_BUDGET_S (wall budget of the Python part, default 285; 560 times the full table);
# GPU_CHECK_DRY=1 (tiny sizes: a CPU smoke test of this script); GPU_CHECK_PROFILE=1 (with OUT:
# trace three train steps into $OUT/trace).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
    exec "$PYTHON" -m benchmarks.gpu_check --help
  fi
done

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "installing bundled wheels from .whl/ into /tmp/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    || echo "WARNING: wheel install failed; continuing without"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# Compiled executables are cached on disk, so a second run of this script skips compilation.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/star_jax_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}"
# The train step at batch 128 in float32 needs most of an 80 GB card.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

echo "== devices"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader || true
else
  echo "nvidia-smi not found"
fi
"$PYTHON" - <<'EOF'
import jax
print("jax", jax.__version__, "| backend", jax.default_backend(), "|", jax.devices())
EOF

start=$(date +%s)
"$PYTHON" -m benchmarks.gpu_check "$@"
status=$?
echo "gpu.sh finished in $(( $(date +%s) - start ))s (python part), exit status $status"
exit $status
