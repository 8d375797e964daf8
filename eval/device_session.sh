#!/usr/bin/env bash
# One prepared command for a lent GPU (issue 15, "On a GPU"): fits the
# device tool's 10-minute limit and leaves its evidence under $OUT.
#
#   bash eval/device_session.sh            # on the GPU machine, repo root
#
# 1. installs the checkout (`--no-deps`: that machine has jax, flax, optax,
#    chex, orbax preinstalled and no network);
# 2. runs the compiled GPU tests (`pytest -m gpu`, every kernel family
#    compiled and compared with the reference on the device), 180 s cap;
# 3. runs the target-first forward benchmark (`eval.bench_kernels --preset
#    h100`), which writes docs/bench_kernels.json and the kernel section of
#    docs/benchmarks.md with the date and the device itself, 360 s budget.
# Logs and copies of the written docs go to $OUT (default /tmp/device_out).
# A `HardwareCheck` is recorded by hand afterwards, and only for a family
# whose tests passed in pytest_gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/session.log"; }

stamp "device:"; { date -u; nvidia-smi -L 2>&1; } | tee -a "$OUT/session.log"
"$PY" -m pip install -q --no-deps -e . > "$OUT/install.log" 2>&1
stamp "install rc=$?"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$OUT/session.log" 2>&1

timeout 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$OUT/pytest_gpu.log" 2>&1
stamp "pytest -m gpu rc=$? (124 = cut at 180 s); tail:"; tail -n 15 "$OUT/pytest_gpu.log" >> "$OUT/session.log"

timeout 400 "$PY" -m eval.bench_kernels --preset h100 --out docs --budget-s 360 \
  > "$OUT/bench.log" 2>&1
stamp "bench_kernels --preset h100 rc=$?"
cp docs/benchmarks.md docs/bench_kernels.json "$OUT"/ 2>/dev/null
stamp "done"
