#!/usr/bin/env bash
# One prepared GPU-machine run (no network there): install ditdeploy offline, then one of
#   bash experiments/gpu_run.sh            # experiments/gpu_torch.py (PyTorch CUDA parity/speed/e2e) + the CUDA training test
#   bash experiments/gpu_run.sh engines    # experiments/gpu_engines.py: eager fp16/bf16, AOTI fp16/bf16/fp8 (+CUDA graphs),
#                                    # torch.compile max-autotune, TensorRT if importable; < 8 minutes in all
#   bash experiments/gpu_run.sh dry-run    # the engines plan only (settings, which hooks this checkout has); no GPU needed
# Everything lands under $OUT (default /tmp/gpu_run); copy $OUT/gpu/*.json into bench/results/ with the machine's
# name (the JSON carries nvidia-smi / torch / CUDA / CPU facts under "machine" and "cuda").
set -u
MODE=${1:-torch}
OUT=${OUT:-/tmp/gpu_run}
BENCH_S=${BENCH_S:-270}
TEST_S=${TEST_S:-120}
ENGINES_S=${ENGINES_S:-400}        # hard limit of the engines run (its own budget is 30 s less)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/gpu"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
{
  python3 -c 'import sys, torch, onnxruntime as o; print(sys.version); print("torch", torch.__version__,
torch.version.cuda, torch.cuda.is_available()); print("ort", o.__version__, o.get_available_providers())'
  python3 -c 'import tensorrt as t; print("tensorrt", t.__version__)' || echo "tensorrt: not importable"
  # editable install without build isolation works offline (setuptools + wheel are in the image)
  timeout 120 python3 -m pip install --no-deps --no-build-isolation --no-index -e . -q \
    || timeout 120 python3 -m pip install --no-deps --no-build-isolation --no-index . -q
  if ! python3 -c 'import experiments.gpu_torch, ditdeploy.runtimes.torch'; then
    # last resort: the package-dir mapping of pyproject.toml rebuilt as a folder on PYTHONPATH
    rm -rf /tmp/shim && mkdir -p /tmp/shim && cp -r ditdeploy /tmp/shim/ \
      && for d in export calibration runtimes bench; do cp -r "$d" "/tmp/shim/ditdeploy/$d"; done
    echo "using the /tmp/shim copy"
  fi
} > "$OUT/install.txt" 2>&1
[ -d /tmp/shim ] && export PYTHONPATH=/tmp/shim

case "$MODE" in
  engines|dry-run)
    extra=(); [ "$MODE" = dry-run ] && extra=(--dry-run)
    timeout "$ENGINES_S" python3 -m experiments.gpu_engines --out "$OUT/gpu" \
      --budget-s $((ENGINES_S - 30)) "${extra[@]}" > "$OUT/gpu_engines.log" 2>&1
    echo "gpu_engines exit $?" >> "$OUT/gpu_engines.log"
    tail -n 3 "$OUT/install.txt" "$OUT/gpu_engines.log"
    ;;
  *)
    timeout "$BENCH_S" python3 -m experiments.gpu_torch --out "$OUT/gpu" > "$OUT/gpu_torch.log" 2>&1
    echo "gpu_torch exit $?" >> "$OUT/gpu_torch.log"
    timeout "$TEST_S" python3 -m pytest -q -p no:cacheprovider tests/test_training_ddp.py > "$OUT/pytest_ddp.txt" 2>&1
    echo "pytest exit $?" >> "$OUT/pytest_ddp.txt"
    tail -n 3 "$OUT/install.txt" "$OUT/gpu_torch.log" "$OUT/pytest_ddp.txt"
    ;;
esac
