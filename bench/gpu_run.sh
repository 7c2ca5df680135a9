#!/usr/bin/env bash
# One prepared GPU-machine run (no network there): install ditdeploy offline, run bench/gpu_torch.py and the CUDA
# training test; everything lands under $OUT (default /tmp/gpu_run). Each step has its own timeout so the whole run
# ends in about BENCH_S + TEST_S + a minute.
#   bash bench/gpu_run.sh            # on the device machine, from the repository root
set -u
OUT=${OUT:-/tmp/gpu_run}
BENCH_S=${BENCH_S:-270}
TEST_S=${TEST_S:-120}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/gpu"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
{
  python3 -c 'import sys, torch, onnxruntime as o; print(sys.version); print("torch", torch.__version__,
torch.version.cuda, torch.cuda.is_available()); print("ort", o.__version__, o.get_available_providers())'
  # editable install without build isolation works offline (setuptools + wheel are in the image)
  timeout 120 python3 -m pip install --no-deps --no-build-isolation --no-index -e . -q \
    || timeout 120 python3 -m pip install --no-deps --no-build-isolation --no-index . -q
  if ! python3 -c 'import ditdeploy.bench.gpu_torch, ditdeploy.runtimes.torch'; then
    # last resort: the package-dir mapping of pyproject.toml rebuilt as a folder on PYTHONPATH
    rm -rf /tmp/shim && mkdir -p /tmp/shim && cp -r ditdeploy /tmp/shim/ \
      && for d in export calibration runtimes bench; do cp -r "$d" "/tmp/shim/ditdeploy/$d"; done
    echo "using the /tmp/shim copy"
  fi
} > "$OUT/install.txt" 2>&1
[ -d /tmp/shim ] && export PYTHONPATH=/tmp/shim

timeout "$BENCH_S" python3 -m ditdeploy.bench.gpu_torch --out "$OUT/gpu" > "$OUT/gpu_torch.log" 2>&1
echo "gpu_torch exit $?" >> "$OUT/gpu_torch.log"

timeout "$TEST_S" python3 -m pytest -q -p no:cacheprovider tests/test_training_ddp.py > "$OUT/pytest_ddp.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest_ddp.txt"
tail -n 3 "$OUT/install.txt" "$OUT/gpu_torch.log" "$OUT/pytest_ddp.txt"
